"""The review page's queue and sign-in (issue 21 item 7), in headless Chromium at 1280x800:
filters offer only the values present in the queue, a reviewer signs in once per tab with a
reviewer key (an admin key is refused and never kept), one image under several rule sets is
one queue entry."""

from __future__ import annotations

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

KEYS = ["alice:alice-key-0123456789:reviewer", "ops:ops-key-0123456789abc:admin", "old:old-key-0123456789abc",
        "shop:shop-key-0123456789a:client"]
SHOP = {"Authorization": "Bearer shop-key-0123456789a"}


def _moderate(srv: _Server, colour: tuple[int, int, int], rules: str | None = None, headers: dict[str, str] | None = None) -> int:
    data = {"rules": rules} if rules else {}
    r = httpx.post(srv.url + "/v1/moderate", headers=headers or {}, data=data,
                   files={"image": ("g.png", png(colour, (120, 90)), "image/png")})
    assert r.status_code == 200, r.text
    return int(r.json()["decision_id"])


def _options(driver, element_id: str) -> list[str]:
    return driver.execute_script(
        "return [...document.getElementById(arguments[0]).options].map(o => o.value)", element_id)


def _shown(driver, element_id: str) -> bool:
    return driver.find_element("id", element_id).is_displayed()


@pytest.fixture
def page(browser, monkeypatch):  # noqa: F811 - the imported fixture
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    browser.set_window_size(1280, 800)
    try:
        yield browser
    finally:
        browser.execute_script("sessionStorage.clear(); localStorage.clear();")
        browser.set_window_size(1400, 1000)


def test_queue_filters_offer_only_the_values_in_the_queue(page, tmp_path):
    driver = page
    db = tmp_path / "f.sqlite"
    moderator = Moderator(ColourBackend(refuse_green=True), policy="icm-sexy")
    with _Server(ServeConfig(db=str(db)), moderator=moderator) as srv:
        ids = [_moderate(srv, (10 * i, 250, 0)) for i in range(3)]
        driver.get(srv.url + "/review")
        driver.execute_script("localStorage.setItem('icm-reviewer', 'alice');")
        driver.get(srv.url + "/review")
        _wait(driver, lambda d: len(d.find_elements("css selector", "#queue-list li")) == 3)
        # decisions like the detector's name no product: the product filter has nothing to offer
        _wait(driver, lambda d: _options(d, "q-policy") == ["", "icm-sexy"])
        assert _options(driver, "q-product") == [""] and not _shown(driver, "q-product")
        assert _options(driver, "q-verdict") == ["", "review"]
        # two products present: exactly those are offered
        store = DecisionStore("sqlite:///" + str(db))
        with store.engine.begin() as conn:
            for did, product in zip(ids, ["upper_chest", "buttocks", "upper_chest"], strict=True):
                conn.execute(store._decisions.update().where(store._decisions.c.id == did).values(product=product))
        store.close()
        driver.find_element("id", "queue-refresh").click()
        _wait(driver, lambda d: _options(d, "q-product") == ["", "buttocks", "upper_chest"])
        assert _shown(driver, "q-product")


def test_sign_in_with_a_reviewer_key_once_per_tab_admin_keys_refused(page, tmp_path):
    from selenium.webdriver.common.keys import Keys

    driver = page
    with _Server(ServeConfig(db=str(tmp_path / "k.sqlite"), api_keys=KEYS),
                 moderator=Moderator(ColourBackend(refuse_green=True), policy="icm-sexy")) as srv:
        _moderate(srv, (0, 255, 0), headers=SHOP)
        driver.get(srv.url + "/review")
        driver.execute_script("sessionStorage.clear();")
        for key, who in (("ops-key-0123456789abc", "ops"), ("old-key-0123456789abc", "old")):  # an admin, a key without a role
            driver.get(srv.url + "/review")
            _wait(driver, lambda d: "API key" in _text(d, "status"))
            driver.find_element("id", "api-key").send_keys(key, Keys.TAB)
            _wait(driver, lambda d, who=who: f"admin key ({who})" in _text(d, "status"))
            assert "Create a reviewer key" in _text(driver, "status")
            assert driver.execute_script("return sessionStorage.getItem('icm-api-key')") is None
            assert driver.find_element("id", "api-key").get_attribute("value") == ""
            assert driver.find_elements("css selector", "#queue-list li") == []
        # a reviewer key works, is asked for once and survives a reload of the tab
        driver.find_element("id", "api-key").send_keys("alice-key-0123456789", Keys.TAB)
        _wait(driver, lambda d: len(d.find_elements("css selector", "#queue-list li")) == 1)
        assert driver.execute_script("return sessionStorage.getItem('icm-api-key')") == "alice-key-0123456789"
        assert not _shown(driver, "api-key") and _shown(driver, "sign-out")
        driver.refresh()
        _wait(driver, lambda d: len(d.find_elements("css selector", "#queue-list li")) == 1)
        assert "key alice (reviewer)" in _text(driver, "server") and not _shown(driver, "api-key")


def test_one_image_under_two_rule_sets_is_one_queue_entry(page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    driver = page
    db = tmp_path / "g.sqlite"
    with _Server(ServeConfig(db=str(db)), moderator=Moderator(ColourBackend(refuse_green=True), policy="icm-sexy")) as srv:
        general = _moderate(srv, (0, 255, 0), rules="general-audience")
        children = _moderate(srv, (0, 255, 0), rules="children")  # the same image
        other = _moderate(srv, (40, 220, 0), rules="general-audience")
        driver.get(srv.url + "/review")
        driver.execute_script("localStorage.setItem('icm-reviewer', 'alice');")
        driver.get(srv.url + "/review")
        _wait(driver, lambda d: _text(d, "queue-count") == "(3 waiting)")
        entries = driver.find_elements("css selector", "#queue-list li")
        assert [li.get_attribute("data-ids") for li in entries] == [f"{general},{children}", str(other)]
        assert "general-audience" in entries[0].text and "children" in entries[0].text and entries[0].text.count("REVIEW") == 2
        entries[0].click()
        _wait(driver, lambda d: _text(d, "decision-id").startswith(f"#{general} "))
        # both rule sets' verdicts side by side in the detail
        rows = driver.find_elements("css selector", "#rule-sets tbody tr")
        assert [r.get_attribute("data-id") for r in rows] == [str(general), str(children)]
        assert "icm-sexy/general-audience" in rows[0].text and "icm-sexy/children" in rows[1].text
        assert driver.find_element("id", "rule-sets").is_displayed()
        # each rule set is reviewed on its own: after A, the same image's other rule set comes next
        ActionChains(driver).send_keys("a").perform()
        _wait(driver, lambda d: _text(d, "decision-id").startswith(f"#{children} "))
        ActionChains(driver).send_keys("b").perform()
        _wait(driver, lambda d: _text(d, "decision-id").startswith(f"#{other} "))
        store = DecisionStore("sqlite:///" + str(db))
        assert [(r["decision_id"], r["verdict"]) for r in store.reviews()] == [(general, "allow"), (children, "block")]
        store.close()
