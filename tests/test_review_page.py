"""The review page in headless Chromium (Selenium): upload, see the verdict, override it,
then find the override in the database and in the training export.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the ``selenium`` pip
package; skips with a message saying what is missing. Never downloads a browser.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
uvicorn = pytest.importorskip("uvicorn")

from typer.testing import CliRunner  # noqa: E402

from icm.cli.main import app as cli  # noqa: E402
from icm.serve import ServeConfig, create_app  # noqa: E402
from icm.serve.store import DecisionStore  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
PHOTO = EXAMPLES / "grace_hopper.jpg"
CHROME_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def _browser() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("browser tests need the selenium package (pip install selenium)")
    binary = next(
        (p for p in (os.environ.get("ICM_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")) if p),
        None,
    )
    driver = os.environ.get("ICM_CHROMEDRIVER") or shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip(
            "browser tests need Chromium and its driver: apt-get install chromium chromium-driver "
            f"(found chromium={binary}, chromedriver={driver})"
        )
    return binary, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = binary
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class _Server:
    def __init__(self, config: ServeConfig) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _wait(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).get_attribute("textContent") or ""


def test_upload_see_the_verdict_override_and_export(browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    db = tmp_path / "decisions.sqlite"
    driver = browser
    with _Server(ServeConfig(db=str(db))) as srv:
        driver.get(srv.url + "/")  # redirects to the review page
        assert driver.current_url.endswith("/review")
        _wait(driver, lambda d: len(Select(d.find_element("id", "upload-rules")).options) >= 4)
        reviewer = driver.find_element("id", "reviewer")
        reviewer.send_keys("Ada Reviewer", Keys.TAB)
        Select(driver.find_element("id", "upload-rules")).select_by_value("children")

        driver.find_element("id", "upload-file").send_keys(str(PHOTO))
        driver.find_element("id", "upload-submit").click()
        _wait(driver, lambda d: _text(d, "decision-id").startswith("#1") and _text(d, "verdict"))

        store = DecisionStore("sqlite:///" + str(db))
        (row,) = store.list_decisions()
        record = store.get_decision(row["id"])["record"]
        assert row["source"] == "page" and row["rules"] == "children" and row["image_name"] == PHOTO.name
        # what the page shows is what was decided
        assert _text(driver, "verdict") == record["verdict"]
        assert driver.find_element("id", "verdict").text == record["verdict"].upper()
        assert _text(driver, "reason") == record["reason"]
        assert _text(driver, "p-violation").startswith(f"{record['p_violation']:.3f}")
        assert _text(driver, "meta").startswith("icm-sexy / children / detector")
        expected_product = record["product"] or "not identified"
        assert _text(driver, "product").startswith(expected_product)
        assert _text(driver, "rule").startswith(record["rule"] or "none")
        assert "not judged" in _text(driver, "product") or record["product"]
        # the image, with the detector's boxes drawn over it at their place
        _wait(driver, lambda d: d.execute_script("return document.getElementById('image').naturalWidth") == record["width"])
        boxes = driver.find_elements("css selector", "#boxes .box")
        assert len(boxes) == len(record["boxes"])
        if importlib.util.find_spec("nudenet") is not None:
            assert boxes, "NudeNet finds a face in this photo: its box must be drawn"
        for el, b in zip(boxes, record["boxes"]):
            left = float(el.value_of_css_property("left")[:-2])
            shown = driver.find_element("id", "image").size["width"]
            assert left == pytest.approx(b["box"][0] / record["width"] * shown, abs=1.5)
            assert b["label"] in el.text
        # the decision is listed
        first_row = driver.find_element("css selector", "#decisions tbody tr")
        assert first_row.get_attribute("data-id") == str(row["id"]) and PHOTO.name in first_row.text

        # override: block, with the correct product and a note
        assert record["verdict"] != "block"
        Select(driver.find_element("id", "override-verdict")).select_by_value("block")
        Select(driver.find_element("id", "override-product")).select_by_value("upper_chest")
        driver.find_element("id", "note").send_keys("Reviewed by hand for the children's service.")
        driver.find_element("id", "override-submit").click()
        _wait(driver, lambda d: _text(d, "review-status").startswith("Saved: override"))
        assert "by Ada Reviewer" in _text(driver, "review-status")
        _wait(driver, lambda d: "override \u2192 block (Ada Reviewer)" in d.find_element("css selector", "#decisions tbody tr").text)
        assert "Ada Reviewer overrides \u2192 block, product upper_chest" in _text(driver, "reviews")
        if os.environ.get("ICM_SCREENSHOT"):
            driver.save_screenshot(os.environ["ICM_SCREENSHOT"])

        # in the database
        (review,) = store.reviews(row["id"])
        assert review["reviewer"] == "Ada Reviewer" and review["action"] == "override" and review["verdict"] == "block"
        assert review["product"] == "upper_chest" and review["note"].startswith("Reviewed by hand")
        assert abs(time.time() - _epoch(review["created_at"])) < 120
        store.close()

    # in the export
    out = tmp_path / "reviews.jsonl"
    result = CliRunner().invoke(cli, ["data", "export-reviews", "--db", str(db), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["decision_id"] == row["id"] and rec["verdict"] == "block" and rec["action"] == "override"
    assert rec["reviewer"] == "Ada Reviewer" and rec["product"] == "upper_chest" and rec["rules"] == "children"
    assert Path(rec["images"][0]).read_bytes() == PHOTO.read_bytes()
    assert rec["messages"][-1]["content"][0]["text"] == "block"


def test_page_with_api_keys_asks_for_the_key(browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.keys import Keys

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    driver = browser
    with _Server(ServeConfig(db=str(tmp_path / "d.sqlite"), api_keys=["team:s3cret-0123456789ab"])) as srv:
        driver.get(srv.url + "/review")
        _wait(driver, lambda d: "API key" in _text(d, "status"))
        driver.find_element("id", "api-key").send_keys("s3cret-0123456789ab", Keys.TAB)
        _wait(driver, lambda d: "icm-sexy" in _text(d, "upload-policy"))
        driver.find_element("id", "upload-file").send_keys(str(EXAMPLES / "flower.jpg"))
        driver.find_element("id", "upload-submit").click()
        _wait(driver, lambda d: _text(d, "verdict") in ("allow", "review", "block"))
        _wait(driver, lambda d: d.execute_script("return document.getElementById('image').naturalWidth") > 0)
        # no reviewer name typed: the key's name is recorded
        driver.find_element("id", "override-submit").click()
        _wait(driver, lambda d: _text(d, "review-status").startswith("Saved"))
        assert "by team" in _text(driver, "review-status")


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
