"""The review page for a day's work (issue 21 item 7), in headless Chromium at 1280x800:
blurred images, zoom, undo, the session's progress, keyboard help, the decision controls in
view, skipped items remembered, errors that clear; and the undo route's rules over HTTP."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_review_page import _Server, _text, _wait, browser  # noqa: F401 - browser is a fixture

from icm.moderation.engine import Moderator
from icm.serve import ServeConfig
from icm.serve.store import DecisionStore

from serve_helpers import ColourBackend, png

KEYS = ["alice:alice-key-0123456789:reviewer", "bob:bob-key-0123456789ab:reviewer", "shop:shop-key-0123456789a:client"]


def _queued(srv: _Server, n: int, headers: dict[str, str] | None = None) -> list[int]:
    """n green images, which the colour backend sends to review."""
    ids = []
    for i in range(n):
        r = httpx.post(
            srv.url + "/v1/moderate", headers=headers or {},
            files={"image": (f"g{i + 1}.png", png((10 * i, 255 - 10 * i, 0), (120, 90)), "image/png")},
        )
        assert r.status_code == 200, r.text
        ids.append(r.json()["decision_id"])
    return ids


def _showing(decision_id: int):
    return lambda d: _text(d, "decision-id").startswith(f"#{decision_id} ") and not d.find_element("id", "claim-banner").get_attribute("hidden")


def _filter(driver, css: str) -> str:
    return driver.execute_script("return getComputedStyle(document.querySelector(arguments[0])).filter", css)


def _in_view(driver, element_id: str) -> bool:
    return driver.execute_script("""
        const r = document.getElementById(arguments[0]).getBoundingClientRect();
        return r.width > 0 && r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth;
    """, element_id)


@pytest.fixture
def workday(browser, tmp_path, monkeypatch):  # noqa: F811 - the imported fixture
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    db = tmp_path / "w.sqlite"
    with _Server(ServeConfig(db=str(db)), moderator=Moderator(ColourBackend(refuse_green=True), policy="icm-sexy")) as srv:
        ids = _queued(srv, 4)
        browser.set_window_size(1280, 800)
        browser.get(srv.url + "/review")
        browser.execute_script("sessionStorage.clear(); localStorage.clear(); localStorage.setItem('icm-reviewer', 'alice');")
        browser.get(srv.url + "/review")
        _wait(browser, lambda d: len(d.find_elements("css selector", "#queue-list li")) == 4)
        store = DecisionStore("sqlite:///" + str(db))
        try:
            yield browser, srv, ids, store
        finally:
            store.close()
            browser.execute_script("sessionStorage.clear(); localStorage.clear();")
            browser.set_window_size(1400, 1000)


def test_images_are_blurred_until_revealed_and_the_setting_is_remembered(workday):
    driver, srv, ids, _store = workday
    _wait(driver, lambda d: d.execute_script("return document.querySelector('#queue-list img').naturalWidth") > 0)
    assert "blur" in _filter(driver, "#queue-list img")
    driver.find_element("id", "queue-start").click()
    _wait(driver, _showing(ids[0]))
    _wait(driver, lambda d: d.execute_script("return document.getElementById('image').naturalWidth") == 120)
    assert "blur" in _filter(driver, "#image")
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys("r").perform()  # reveal this one
    _wait(driver, lambda d: _filter(d, "#image") == "none")
    driver.find_element("id", "blur-toggle").click()  # off, and remembered after a reload
    driver.get(srv.url + "/review#decision=" + str(ids[1]))
    _wait(driver, lambda d: _text(d, "decision-id").startswith(f"#{ids[1]} "))
    assert driver.find_element("id", "blur-toggle").is_selected() is False
    assert _filter(driver, "#image") == "none" and _filter(driver, "#queue-list img") == "none"


def test_decision_controls_are_in_view_at_1280x800_and_the_image_zooms(workday):
    from selenium.webdriver.common.action_chains import ActionChains

    driver, _srv, ids, _store = workday
    driver.find_element("id", "queue-start").click()
    _wait(driver, _showing(ids[0]))
    _wait(driver, lambda d: d.execute_script("return document.getElementById('image').naturalWidth") == 120)
    for control in ("confirm", "override-verdict", "override-submit"):
        assert _in_view(driver, control), control
    driver.execute_script("window.scrollTo(0, document.documentElement.scrollHeight)")  # the left column scrolled
    time.sleep(0.2)
    assert _in_view(driver, "confirm") and _in_view(driver, "override-submit")

    shown = driver.find_element("id", "image").size["width"]
    driver.find_element("id", "figure").click()
    _wait(driver, lambda d: d.find_element("id", "zoom").is_displayed())
    assert driver.find_element("id", "zoom-image").size["width"] > 2 * shown
    ActionChains(driver).send_keys("\ue00c").perform()  # Escape
    _wait(driver, lambda d: not d.find_element("id", "zoom").is_displayed())


def test_keyboard_help_progress_and_undo(workday):
    from selenium.webdriver.common.action_chains import ActionChains

    driver, _srv, ids, store = workday
    g1, g2, g3, _g4 = ids
    ActionChains(driver).send_keys("?").perform()
    _wait(driver, lambda d: d.find_element("id", "help").is_displayed())
    assert "undo" in driver.find_element("id", "help").text.lower()
    ActionChains(driver).send_keys("?").perform()
    _wait(driver, lambda d: not d.find_element("id", "help").is_displayed())

    driver.find_element("id", "queue-start").click()
    _wait(driver, _showing(g1))
    ActionChains(driver).send_keys("a").perform()
    _wait(driver, _showing(g2))
    ActionChains(driver).send_keys("b").perform()
    _wait(driver, _showing(g3))
    assert _text(driver, "progress").startswith("This session: 2 decided (1 allow, 1 block)")
    assert [(r["decision_id"], r["verdict"]) for r in store.reviews()] == [(g1, "allow"), (g2, "block")]
    assert driver.find_element("id", "undo-bar").is_displayed()

    ActionChains(driver).send_keys("u").perform()  # the block of g2 was a slip
    _wait(driver, _showing(g2))
    assert [(r["decision_id"], r["verdict"]) for r in store.reviews()] == [(g1, "allow")]
    assert [i["id"] for i in store.queue()] == [g2, g3, ids[3]]
    assert "Claimed by alice" in _text(driver, "claim-banner")
    assert _text(driver, "progress").startswith("This session: 1 decided (1 allow, 0 block), 1 undone")
    assert not driver.find_element("id", "undo-bar").is_displayed()
    ActionChains(driver).send_keys("a").perform()
    _wait(driver, _showing(g3))
    assert [(r["decision_id"], r["verdict"]) for r in store.reviews()] == [(g1, "allow"), (g2, "allow")]


def test_skipped_items_are_marked_after_a_reload_and_a_409_clears(workday):
    from selenium.webdriver.common.action_chains import ActionChains

    driver, srv, ids, _store = workday
    g1, g2, g3, g4 = ids
    driver.find_element("id", "queue-start").click()
    _wait(driver, _showing(g1))
    ActionChains(driver).send_keys("s").perform()
    _wait(driver, _showing(g2))
    driver.get(srv.url + "/review")
    _wait(driver, lambda d: len(d.find_elements("css selector", "#queue-list li")) == 4)
    marked = [li.get_attribute("data-id") for li in driver.find_elements("css selector", "#queue-list li.skipped")]
    assert marked == [str(g1)]
    assert "skipped" in driver.find_element("css selector", f'#queue-list li[data-id="{g1}"]').text
    driver.find_element("id", "queue-start").click()  # still skipped after the reload
    _wait(driver, _showing(g2))

    assert httpx.post(f"{srv.url}/v1/decisions/{g4}/claim", json={"reviewer": "bob"}).status_code == 200
    driver.find_element("css selector", f'#queue-list li[data-id="{g4}"]').click()
    _wait(driver, lambda d: _text(d, "status").startswith("409"))
    driver.find_element("css selector", f'#queue-list li[data-id="{g3}"]').click()  # the next action
    _wait(driver, _showing(g3))
    assert _text(driver, "status") == ""


def test_a_reviewer_withdraws_only_their_own_review_and_only_soon(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    pytest.importorskip("fastapi.testclient")
    from fastapi.testclient import TestClient

    from icm.serve import create_app

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + next(k.split(":")[1] for k in KEYS if k.startswith(name + ":"))}

    for undo_seconds, late in ((30.0, False), (0.0, True)):
        cfg = ServeConfig(db=str(tmp_path / f"u{undo_seconds:g}.sqlite"), api_keys=KEYS, undo_seconds=undo_seconds)
        with TestClient(create_app(cfg, moderator=Moderator(ColourBackend(refuse_green=True), policy="icm-sexy"))) as c:
            r = c.post("/v1/moderate", headers=auth("shop"), files={"image": ("g.png", png((0, 255, 0), (64, 48)), "image/png")})
            did = r.json()["decision_id"]
            rev = c.post(f"/v1/decisions/{did}/reviews", headers=auth("alice"), json={"verdict": "block"}).json()
            url = f"/v1/decisions/{did}/reviews/{rev['id']}"
            assert c.delete(url, headers=auth("shop")).status_code == 403  # a client key does not review
            bob = c.delete(url, headers=auth("bob"))
            assert bob.status_code == 409 and "only its reviewer" in bob.text
            r = c.delete(url, headers=auth("alice"))
            if late:
                assert r.status_code == 409 and "review the decision again" in r.text
                continue
            assert r.status_code == 200 and r.json()["verdict"] == "block"
            assert c.get(f"/v1/decisions/{did}", headers=auth("alice")).json()["reviews"] == []
            assert [i["id"] for i in c.get("/v1/review-queue", headers=auth("alice")).json()["items"]] == [did]
            assert c.delete(url, headers=auth("alice")).status_code == 404
