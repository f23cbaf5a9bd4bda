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
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
uvicorn = pytest.importorskip("uvicorn")

from typer.testing import CliRunner

from icm.cli.main import app as cli
from icm.serve import ServeConfig, create_app
from icm.serve.store import DecisionStore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
PHOTO = EXAMPLES / "grace_hopper.jpg"
CHROME_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def _browser() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401 - only whether it imports
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
    def __init__(self, config: ServeConfig, moderator: object | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config, moderator=moderator), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
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
        for el, b in zip(boxes, record["boxes"], strict=True):
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
    import httpx
    from selenium.webdriver.common.keys import Keys

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    driver = browser
    keys = ["team:s3cret-0123456789ab:reviewer", "shop:shop-key-0123456789a:client"]
    with _Server(ServeConfig(db=str(tmp_path / "d.sqlite"), api_keys=keys)) as srv:
        r = httpx.post(srv.url + "/v1/moderate", headers={"Authorization": "Bearer shop-key-0123456789a"},
                       files={"image": ("flower.jpg", (EXAMPLES / "flower.jpg").read_bytes(), "image/jpeg")}, timeout=300)
        assert r.status_code == 200, r.text
        driver.get(srv.url + f"/review#decision={r.json()['decision_id']}")
        driver.execute_script("sessionStorage.clear();")
        driver.refresh()
        _wait(driver, lambda d: "API key" in _text(d, "status"))
        driver.find_element("id", "reviewer").send_keys("Mallory", Keys.TAB)  # a name other than the key's
        driver.find_element("id", "api-key").send_keys("s3cret-0123456789ab", Keys.TAB)
        _wait(driver, lambda d: _text(d, "verdict") in ("allow", "review", "block"))
        # the key's name replaces what was typed, and cannot be edited: the server records it (issue 20)
        reviewer = driver.find_element("id", "reviewer")
        assert reviewer.get_attribute("value") == "team" and reviewer.get_attribute("readonly") is not None
        _wait(driver, lambda d: d.execute_script("return document.getElementById('image').naturalWidth") > 0)
        driver.find_element("id", "override-submit").click()
        _wait(driver, lambda d: _text(d, "review-status").startswith("Saved"))
        assert "by team" in _text(driver, "review-status")
        driver.execute_script("sessionStorage.clear();")


def _overflowing(driver) -> list[str]:
    """Controls whose box reaches outside their card (section), and page-wide horizontal overflow."""
    return driver.execute_script("""
        const out = [];
        for (const sec of document.querySelectorAll('section')) {
          if (sec.hidden) continue;
          const box = sec.getBoundingClientRect();
          for (const c of sec.querySelectorAll('select, input, button, textarea, img, table')) {
            const r = c.getBoundingClientRect();
            if (r.width === 0 && r.height === 0) continue;
            if (r.left < box.left - 0.5 || r.right > box.right + 0.5) out.push((c.id || c.tagName) + ' in ' + sec.id);
          }
        }
        const doc = document.documentElement;
        if (doc.scrollWidth > doc.clientWidth + 1) out.push('page ' + doc.scrollWidth + ' > ' + doc.clientWidth);
        return out;
    """)


def test_the_queue_claim_keyboard_decisions_and_the_queue_emptying(browser, tmp_path, monkeypatch):
    """Four images the model sends to review; bob holds one. Alice works through the queue
    with the keyboard only (A allow, S skip, B block), never gets bob's item, sees the queue
    empty; every decision is stored with who and when, and the model's own stays."""
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    from icm.moderation.engine import Moderator

    from serve_helpers import ColourBackend, png

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    db = tmp_path / "q.sqlite"
    driver = browser
    moderator = Moderator(ColourBackend(refuse_green=True), policy="icm-sexy")
    with _Server(ServeConfig(db=str(db)), moderator=moderator) as srv:
        ids = []
        for i, colour in enumerate([(0, 255, 0), (10, 240, 0), (20, 230, 0), (30, 220, 0), (255, 0, 0)]):
            r = httpx.post(srv.url + "/v1/moderate", files={"image": (f"g{i + 1}.png", png(colour, (120, 90)), "image/png")})
            assert r.status_code == 200, r.text
            ids.append(r.json()["decision_id"])
        g1, g2, g3, g4, red = ids
        assert httpx.post(f"{srv.url}/v1/decisions/{g2}/claim", json={"reviewer": "bob"}).status_code == 200

        driver.set_window_size(1024, 800)
        driver.get(srv.url + "/review")
        driver.find_element("id", "reviewer").send_keys("alice", Keys.TAB)
        _wait(driver, lambda d: len(d.find_elements("css selector", "#queue-list li")) == 4)
        assert _text(driver, "queue-count") == "(4 waiting)"
        items = driver.find_elements("css selector", "#queue-list li")
        assert [li.get_attribute("data-id") for li in items] == [str(i) for i in (g1, g2, g3, g4)], "oldest first; red is not queued"
        assert "claimed by bob" in items[1].text
        _wait(driver, lambda d: d.execute_script(
            "return [...document.querySelectorAll('#queue-list img')].every(i => i.naturalWidth > 0)"))
        assert driver.execute_script("return document.querySelector('#queue-list img').naturalWidth") == 120  # a thumbnail

        def showing(decision_id: int):
            return lambda d: _text(d, "decision-id").startswith(f"#{decision_id} ") and not d.find_element("id", "claim-banner").get_attribute("hidden")

        driver.find_element("id", "queue-start").click()
        _wait(driver, showing(g1))
        assert "Claimed by alice" in _text(driver, "claim-banner")
        store = DecisionStore("sqlite:///" + str(db))
        assert [i["claimed_by"] for i in store.queue()] == ["alice", "bob", None, None]
        # layout at 1024 px: no control leaves its card, nothing scrolls sideways
        assert _overflowing(driver) == []

        keys = ActionChains(driver)
        keys.send_keys("a").perform()
        _wait(driver, showing(g3))  # bob's g2 is never offered
        ActionChains(driver).send_keys("s").perform()
        _wait(driver, showing(g4))
        ActionChains(driver).send_keys("b").perform()
        _wait(driver, lambda d: "queue is empty" in _text(d, "status"))
        _wait(driver, lambda d: _text(d, "queue-count") == "(2 waiting)")
        assert _text(driver, "claim-banner") == "" or driver.find_element("id", "claim-banner").get_attribute("hidden")
        # a key typed into a field is text, not a decision
        note = driver.find_element("id", "note")
        note.send_keys("b")
        time.sleep(0.5)  # a decision made by that key would be stored by now
        assert len(store.reviews()) == 2

        # bob decides his item; alice starts again and takes the one she skipped
        assert httpx.post(f"{srv.url}/v1/decisions/{g2}/reviews", json={"verdict": "allow", "reviewer": "bob"}).status_code == 201
        driver.find_element("id", "queue-start").click()
        _wait(driver, showing(g3))
        driver.find_element("id", "queue-start").send_keys(Keys.ESCAPE)  # focus on a button: keys still decide
        ActionChains(driver).send_keys("a").perform()
        _wait(driver, lambda d: _text(d, "queue-count") == "(0 waiting)")
        _wait(driver, lambda d: d.find_element("id", "queue-empty").is_displayed())
        assert driver.find_elements("css selector", "#queue-list li") == []
        assert _overflowing(driver) == []

        got = [(r["decision_id"], r["reviewer"], r["verdict"]) for r in store.reviews()]
        assert got == [(g1, "alice", "allow"), (g4, "alice", "block"), (g2, "bob", "allow"), (g3, "alice", "allow")]
        assert all(store.get_decision(i)["verdict"] == "review" for i in (g1, g2, g3, g4)), "the model's decisions stay"
        assert store.get_decision(red)["reviews"] == []
        assert "Reviewers agree with the model" in _text(driver, "agreement")
        store.close()
        driver.set_window_size(1400, 1000)


def test_no_control_overflows_its_card_from_1024_px_up(browser, tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    driver = browser
    with _Server(ServeConfig(db=str(tmp_path / "d.sqlite"))) as srv:
        httpx = pytest.importorskip("httpx")
        r = httpx.post(srv.url + "/v1/moderate", files={"image": (PHOTO.name, PHOTO.read_bytes(), "image/jpeg")}, timeout=300)
        did = r.json()["decision_id"]
        try:
            for width in (1024, 1280, 1920):
                driver.set_window_size(width, 900)
                driver.get(f"{srv.url}/review#decision={did}")
                _wait(driver, lambda d: _text(d, "decision-id").startswith(f"#{did}"))
                _wait(driver, lambda d: len(d.find_elements("css selector", "#upload-rules option")) >= 4)
                assert _overflowing(driver) == [], width
        finally:
            driver.set_window_size(1400, 1000)


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
