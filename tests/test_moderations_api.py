"""`POST /v1/moderations`: OpenAI's moderation API, with the official `openai` SDK as the client.

The server runs for real (uvicorn on a loopback port); the SDK is pointed at it by its
base URL only. Image URLs are fetched only from allow-listed hosts and never from private
addresses, before or after a redirect.
"""

from __future__ import annotations

import base64
import http.server
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import httpx

from icm.moderation.engine import Moderator
from icm.serve import ServeConfig, create_app
from icm.serve.fetch import FetchPolicy, ImageFetcher, host_listed, public_address
from icm.serve.openai_results import OPENAI_CATEGORIES

from serve_helpers import ColourBackend, live_server, png

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
KEY = "alice:" + "s3cret-key-for-tests-0123"
TOKEN = KEY.split(":", 1)[1]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def make_app(tmp_path: Path, moderator: Moderator | None = None, **kw):
    kw.setdefault("db", str(tmp_path / "d.sqlite"))
    return create_app(ServeConfig(api_keys=[KEY], **kw), moderator=moderator)


def client(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0, **kw)


def test_the_openai_sdk_moderates_the_sample_photos_as_not_flagged(tmp_path, monkeypatch):
    """The detector backend (real models), the official SDK reading its typed fields: one
    result per input (an array of parts is one input), all 13 categories typed, the sample
    photos not flagged, icm-sexy judged as OpenAI's `sexual`, each stored decision listed."""
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    photos = sorted(EXAMPLES.glob("*.jpg"))
    app = make_app(tmp_path)
    with live_server(app) as base:
        sdk = client(base)
        resp = sdk.moderations.create(input=[part(data_url(p.read_bytes(), "image/jpeg")) for p in photos])
        assert resp.id.startswith("modr-") and resp.model == "icm-sexy:icm-default"
        (result,) = resp.results  # one input, however many images
        assert result.flagged is False
        assert result.categories.sexual is False and result.categories.violence_graphic is False
        assert result.categories.self_harm_intent is False and result.categories.illicit_violent is False
        assert set(result.categories.model_dump(by_alias=True)) >= set(OPENAI_CATEGORIES)
        assert all(isinstance(v, bool) for v in result.categories.model_dump(by_alias=True).values())
        assert all(isinstance(v, float) for v in result.category_scores.model_dump(by_alias=True).values())
        assert result.category_applied_input_types.sexual == ["image"]
        assert result.category_applied_input_types.violence == [] and result.category_applied_input_types.self_harm == []
        icm = result.model_extra["icm"]
        assert icm["images"] == len(photos) and icm["verdicts"] == {"icm-sexy:icm-default": "allow"}
        decisions = icm["decisions"]
        assert [d["image"] for d in decisions] == list(range(len(photos)))
        assert result.category_scores.sexual == pytest.approx(max(d["record"]["category_scores"]["openai"]["sexual"] for d in decisions))
        for d in decisions:
            assert d["record"]["verdict"] == "allow" and d["record"]["backend"] == "detector"
            stored = httpx.get(f"{base}/v1/decisions/{d['decision_id']}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
            assert stored["verdict"] == "allow" and stored["source"] == "data-url"
        # a list of strings: one input (one result) per string
        many = sdk.moderations.create(input=[data_url(p.read_bytes(), "image/jpeg") for p in photos[:2]])
        assert len(many.results) == 2 and not any(r.flagged for r in many.results)
        # a rule set named in the model, one image as a plain data: URL string
        one = sdk.moderations.create(model="icm-sexy:children", input=data_url(photos[0].read_bytes(), "image/jpeg"))
        assert one.model == "icm-sexy:children" and not one.results[0].flagged
        assert one.results[0].model_extra["icm"]["decisions"][0]["record"]["rules"] == "children"


def test_several_policies_at_once_and_a_flagged_image(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    backend = ColourBackend()
    app = make_app(tmp_path, Moderator(backend, policy="icm-sexy"), policies=["gambling"])
    with live_server(app) as base:
        sdk = client(base)
        red, blue = data_url(png((255, 0, 0))), data_url(png((0, 0, 255)))
        resp = sdk.moderations.create(model="icm-sexy:children,gambling", input=[red, blue])
        assert resp.model == "icm-sexy:children,gambling:gambling-default"
        flagged, clean = resp.results
        assert flagged.flagged and flagged.categories.sexual is True and flagged.category_scores.sexual > 0.3
        verdicts = flagged.model_extra["icm"]["verdicts"]
        assert verdicts["icm-sexy:children"] == "block" and set(verdicts) == {"icm-sexy:children", "gambling:gambling-default"}
        assert not clean.flagged and not any(clean.categories.model_dump(by_alias=True).values())
        assert clean.category_applied_input_types.sexual == ["image"]
        # one input of two images: the worst decides, every image's decisions are listed
        (both,) = sdk.moderations.create(model="icm-sexy:children", input=[part(blue), part(red)]).results
        assert both.flagged and both.categories.sexual is True
        assert [d["image"] for d in both.model_extra["icm"]["decisions"]] == [0, 1]
        # 2 images x 2 policies + 2 images x 1 policy = 6 stored decisions
        total = httpx.get(f"{base}/v1/decisions", headers={"Authorization": f"Bearer {TOKEN}"}).json()["total"]
        assert total == 6


def test_bad_input_gets_a_clear_error_through_the_sdk(tmp_path, monkeypatch):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    backend = ColourBackend(fail_green=True)
    app = make_app(tmp_path, Moderator(backend, policy="icm-sexy"))
    with live_server(app) as base:
        sdk = client(base)
        with pytest.raises(openai.BadRequestError, match="judges images only") as text:
            sdk.moderations.create(input="I want to hurt them.")
        assert text.value.type == "invalid_request_error" and text.value.code == "text_not_supported"
        with pytest.raises(openai.BadRequestError, match="judges images only"):
            sdk.moderations.create(input=[{"type": "text", "text": "hello"}])
        with pytest.raises(openai.BadRequestError, match=r"input\[1\] is text"):
            sdk.moderations.create(input=[data_url(png((0, 0, 9))), "hello"])
        # text beside an image is accepted and not judged
        ok = sdk.moderations.create(input=[{"type": "text", "text": "hello"}, part(data_url(png((0, 0, 9))))])
        assert ok.results[0].category_applied_input_types.sexual == ["image"]
        assert ok.results[0].model_extra["icm"]["text_parts_ignored"] == 1
        with pytest.raises(openai.BadRequestError, match="no rule set 'nope'") as rules:
            sdk.moderations.create(model="icm-sexy:nope", input=[part(data_url(png((0, 0, 9))))])
        assert rules.value.param == "model"
        with pytest.raises(openai.BadRequestError, match="unknown policy"):
            sdk.moderations.create(model="no-such-policy", input=[part(data_url(png((0, 0, 9))))])
        with pytest.raises(openai.BadRequestError, match=r"does not fetch images from 'example\.com'"):
            sdk.moderations.create(input=[part("https://example.com/cat.jpg")])
        # image data that does not decode: a 400 invalid_request_error naming the input
        with pytest.raises(openai.BadRequestError, match=r"not an image|unsupported") as info:
            sdk.moderations.create(input=[part(data_url(b"plain text, not a picture", "image/png"))])
        assert info.value.type == "invalid_request_error" and info.value.param == "input[0]"
        with pytest.raises(openai.BadRequestError, match="not valid base64") as b64:
            sdk.moderations.create(input=[part(data_url(png((0, 0, 9)))), part("data:image/png;base64,@@not base64@@")])
        assert b64.value.type == "invalid_request_error" and b64.value.param == "input[1]"
        with pytest.raises(openai.BadRequestError, match=r"corrupt|truncated|unreadable"):
            sdk.moderations.create(input=[part(data_url(png((0, 0, 9))[:60]))])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong-key-wrong-key-1", max_retries=0).moderations.create(
                input=[part(data_url(png((0, 0, 9))))]
            )
        # a backend failure is an error, never "flagged: false"
        with pytest.raises(openai.InternalServerError) as failed:
            sdk.moderations.create(input=[part(data_url(png((0, 255, 0))))])
        assert failed.value.status_code == 502 and "green is not allowed" not in str(failed.value)
        total = httpx.get(f"{base}/v1/decisions", headers={"Authorization": f"Bearer {TOKEN}"}).json()["total"]
        assert total == 1, "only the request with text beside its image made a decision"


# --------------------------------------------------------------------------- image URLs


class _Images(http.server.BaseHTTPRequestHandler):
    """/img.png: a PNG; /big: more than the limit; /to?u=URL: a redirect; /loop: redirects to itself."""

    body = png((0, 0, 200))

    def do_GET(self) -> None:
        if self.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the limit is checked while reading
            self.wfile.write(b"\0" * 300_000)
        elif self.path.startswith("/to?u="):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to?u="):])
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_image_urls_only_from_listed_hosts_and_public_addresses(tmp_path, monkeypatch, image_host):
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    port = image_host
    app = make_app(tmp_path, Moderator(ColourBackend(), policy="icm-sexy"), image_url_hosts=["img.test", "inside.test"],
                   max_upload_bytes=200_000)
    names = {"img.test": ["127.0.0.1"], "inside.test": ["10.20.30.40"], "other.test": ["127.0.0.1"]}

    def resolver(host: str, _port: int) -> list[str]:
        return names[host]

    # img.test stands for a public CDN: its (loopback) address counts as public here, nothing else does
    monkeypatch.setattr("icm.serve.fetch.public_address", lambda ip: ip == "127.0.0.1")
    svc = app.state.service
    svc.extras["fetcher"] = ImageFetcher(FetchPolicy(hosts=svc.config.image_url_hosts, max_bytes=200_000, max_redirects=2),
                                         resolver=resolver)
    with live_server(app) as base:
        sdk = client(base)
        ok = sdk.moderations.create(input=[part(f"http://img.test:{port}/img.png")])
        assert ok.results[0].flagged is False
        assert ok.results[0].model_extra["icm"]["decisions"][0]["record"]["sha256"] is not None
        # a redirect is checked again: to a private address, to a host not listed
        with pytest.raises(openai.BadRequestError, match="private or reserved address"):
            sdk.moderations.create(input=[part(f"http://img.test:{port}/to?u=http://inside.test:{port}/img.png")])
        with pytest.raises(openai.BadRequestError, match=r"does not fetch images from 'other\.test'"):
            sdk.moderations.create(input=[part(f"http://img.test:{port}/to?u=http://other.test:{port}/img.png")])
        with pytest.raises(openai.InternalServerError, match="redirected more than 2 times"):
            sdk.moderations.create(input=[part(f"http://img.test:{port}/loop")])
        with pytest.raises(openai.APIStatusError, match="200,000-byte limit") as big:
            sdk.moderations.create(input=[part(f"http://img.test:{port}/big")])
        assert big.value.status_code == 413
        with pytest.raises(openai.BadRequestError, match="data: URLs or http"):
            sdk.moderations.create(input=[part("file:///etc/passwd")])


def test_the_address_checks_themselves():
    assert host_listed("a.example.com", ["*.example.com"]) and host_listed("CDN.example.com.", ["cdn.example.com"])
    assert not host_listed("example.com", ["*.example.com"]) and not host_listed("evilexample.com", ["*.example.com"])
    for ip in ("127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "::1", "fe80::1",
               "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1", "fc00::1", "224.0.0.1"):
        assert not public_address(ip), ip
    assert public_address("93.184.216.34") and public_address("2606:4700::1111")
    # every address a name resolves to is checked, not only the first
    fetcher = ImageFetcher(FetchPolicy(hosts=["cdn.test"], max_bytes=10), resolver=lambda h, p: ["93.184.216.34", "10.0.0.1"])
    with pytest.raises(Exception, match="private or reserved address"):
        fetcher._check("https://cdn.test/x.png")


@pytest.mark.parametrize("unjudged", ["pass", "flag"])
def test_omni_moderation_on_the_offline_detector_reports_what_it_cannot_judge(tmp_path, monkeypatch, unjudged):
    """`omni-moderation-latest` is the icm-standard bundle. On the offline detector the terms
    it can only flag (violence, hate, ...) leave clean photos at review; those verdicts are
    reported as not judged, not as a flag on every photo, unless --unjudged flag asks so."""
    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    photo = sorted(EXAMPLES.glob("*.jpg"))[0]
    app = make_app(tmp_path, unjudged=unjudged)
    with live_server(app) as base:
        (r,) = client(base).moderations.create(model="omni-moderation-latest", input=data_url(photo.read_bytes(), "image/jpeg")).results
    icm = r.model_extra["icm"]
    assert r.category_applied_input_types.sexual == ["image"] and r.categories.sexual is False
    assert r.category_applied_input_types.hate == [] and "hate" in icm["not_judged"]
    assert r.category_applied_input_types.self_harm == [] and "self-harm" in icm["not_judged"]
    assert "review" in icm["verdicts"].values()  # e.g. violence: the detector cannot clear it
    assert r.flagged is (unjudged == "flag")
    assert r.categories.hate is (unjudged == "flag")
