"""The HTTP service: ``create_app(ServeConfig)`` returns a FastAPI app over the engine.

The app is a thin layer over :class:`icm.moderation.engine.Moderator` (what
``icm.moderate`` runs): it decodes the request's image with
:func:`icm.moderation.images.load_image`, queues it for the :class:`DynamicBatcher`, whose
single worker thread moderates a batch and commits its decisions to the
:class:`DecisionStore` before any of its requests is answered.

Routes (all ``/v1`` routes need ``Authorization: Bearer KEY`` when keys are configured):

* ``POST /v1/moderate``: multipart upload (field ``image``), JSON with ``image_base64``,
  or JSON with ``path`` (inside ``--image-root`` only); optional ``policy`` and ``rules``;
* ``GET /v1/policies``; ``GET /v1/decisions``; ``GET /v1/decisions/{id}``;
  ``POST /v1/decisions/{id}/reviews``; ``GET /v1/images/{sha256}``;
* ``GET /healthz`` and ``GET /metrics`` (Prometheus text format);
* ``GET /review``: the review page; ``/docs`` and ``/openapi.json``: the OpenAPI spec.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from icm import __version__
from icm.moderation.backends.base import BackendConfigError
from icm.moderation.engine import Moderator
from icm.moderation.images import ImageLoadError, LoadedImage, load_image
from icm.moderation.record import ModerationRecord
from icm.policy import Policy, load_policy
from icm.serve.auth import Authenticator, cross_site, host_allowed
from icm.serve.batching import BatcherClosed, DynamicBatcher, QueueFull
from icm.serve.config import ServeConfig
from icm.serve.errors import APIError, BodyTooLarge, image_error
from icm.serve.metrics import ServerMetrics
from icm.serve.limits import Overloaded, PixelBudget, RateLimited, RateLimiter, decode_weight, loaded_bytes, reduce_loaded
from icm.serve.paths import PathRefused, read_beneath
from icm.serve.store import FORMAT_MEDIA_TYPES, DecisionMeta, DecisionStore, ImageStore, purge_kept_images

try:
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi import Path as PathParam
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.requests import ClientDisconnect
except ImportError as err:  # pragma: no cover
    raise ImportError(f"the server needs FastAPI ({err}): pip install 'icm-assistant[serve]'") from err

log = logging.getLogger("icm.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
_worker = threading.local()
IMAGE_FIELD = "image"
MAX_ID = 2**63 - 1  # the largest id a SQL integer column holds; larger ones are 422, not a 500

# --------------------------------------------------------------------------- API models


class ModerateJSON(BaseModel):
    """JSON body of ``POST /v1/moderate``: exactly one of ``image_base64`` and ``path``."""

    image_base64: str | None = Field(None, description="The image file's bytes, base64 (a data: URL prefix is accepted)")
    path: str | None = Field(None, description="A file inside the server's --image-root (relative to it)")
    filename: str | None = Field(None, max_length=500, description="A name for the image, recorded with the decision")
    policy: str | None = Field(None, description="Policy name (default: the server's)")
    rules: str | None = Field(None, description="Rule set of the policy (default: the policy's default)")


class ModerateResponse(BaseModel):
    decision_id: int = Field(description="The stored decision's id")
    review_url: str
    record: ModerationRecord


class ReviewIn(BaseModel):
    verdict: Literal["allow", "block"] = Field(description="The reviewer's final verdict")
    product: str | None = Field(None, max_length=200, description="The correct attribute product, if the reviewer names one")
    note: str | None = Field(None, max_length=4000, description="Why; exported as the explanation for tuning")
    reviewer: str | None = Field(None, max_length=200, description="Who reviews (default: the API key's name)")


class ErrorBody(BaseModel):
    error: str
    detail: str


ERRORS = {
    400: {"model": ErrorBody, "description": "Malformed request (bad JSON or base64)"},
    401: {"model": ErrorBody, "description": "Missing or invalid API key"},
    403: {"model": ErrorBody, "description": "Path outside the image folder, paths disabled, or without keys: a non-loopback client, "
          "a Host that is not this machine's, or a request from another site's page"},
    404: {"model": ErrorBody, "description": "No such file, decision or image"},
    413: {"model": ErrorBody, "description": "Image over the byte or pixel limit"},
    415: {"model": ErrorBody, "description": "Not an image, or an unsupported content type"},
    422: {"model": ErrorBody, "description": "Missing field, unknown policy or rule set, empty or corrupt image"},
    429: {"model": ErrorBody, "description": "Over the key's requests per minute (see Retry-After and the RateLimit-* headers)"},
    502: {"model": ErrorBody, "description": "The model backend failed on this image"},
    503: {"model": ErrorBody, "description": "Too many requests or too much memory waiting (see Retry-After), or shutting down"},
}

MODERATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {"type": "string", "format": "binary", "description": "The image file"},
                        "policy": {"type": "string"},
                        "rules": {"type": "string"},
                    },
                }
            },
            "application/json": {"schema": ModerateJSON.model_json_schema()},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

# --------------------------------------------------------------------------- the service


@dataclass
class Job:
    """One image waiting for the batch worker."""

    image: LoadedImage
    data: bytes
    policy: str
    rules: str
    meta: DecisionMeta
    load_ms: float


@dataclass
class Outcome:
    record: ModerationRecord
    decision_id: int | None


@dataclass
class Service:
    """Everything the routes share; ``process`` runs in the batch worker thread."""

    config: ServeConfig
    policies: dict[str, Policy]
    moderators: dict[tuple[str, str], Moderator]
    store: DecisionStore
    images: ImageStore | None
    auth: Authenticator
    metrics: ServerMetrics
    owned: list[Any] = field(default_factory=list)  # backends / store to close on shutdown
    batcher: DynamicBatcher[Job, Outcome] | None = None
    pixels: PixelBudget | None = None  # made in the server's event loop (lifespan)
    limiter: RateLimiter | None = None

    @property
    def default_moderator(self) -> Moderator:
        return next(iter(self.moderators.values()))

    def resolve(self, policy: str | None, rules: str | None) -> tuple[str, str]:
        pname = policy or self.config_policy_name
        if pname not in self.policies:
            raise APIError(422, "unknown_policy", f"unknown policy {pname!r}: this server has {', '.join(self.policies)}")
        p = self.policies[pname]
        if rules is None:
            rname = self.default_rules if pname == self.config_policy_name else p.rule_set().name
        else:
            rname = rules
        if (pname, rname) not in self.moderators:
            known = ", ".join(r.name for r in p.rule_sets)
            raise APIError(422, "unknown_rules", f"policy {pname!r} has no rule set {rname!r} (known: {known})")
        return pname, rname

    @property
    def config_policy_name(self) -> str:
        return self.default_moderator.policy.name

    @property
    def default_rules(self) -> str:
        return self.default_moderator.rule_set.name

    def process(self, jobs: list[Job]) -> list[Outcome]:
        """Moderate a batch (grouped by policy and rule set), keep images, commit decisions."""
        if self.config.torch_threads and not getattr(_worker, "threads_set", False):
            import torch

            torch.set_num_threads(self.config.torch_threads)  # in the worker thread itself
            _worker.threads_set = True
        records: list[ModerationRecord | None] = [None] * len(jobs)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j.policy, j.rules), []).append(i)
        for key, idx in groups.items():
            done = self.moderators[key].moderate_loaded([jobs[i].image for i in idx], [jobs[i].load_ms for i in idx])
            for i, r in zip(idx, done):
                records[i] = r
        ok = [i for i, r in enumerate(records) if r is not None and r.ok]
        for i in ok:
            r, j = records[i], jobs[i]
            if self.images is not None and r is not None and r.sha256:
                self.images.put(r.sha256, j.data)  # before the commit: a stored decision's image exists
                j.meta.image_kept = True
        ids = self.store.add_decisions([records[i] for i in ok], [jobs[i].meta for i in ok])  # type: ignore[misc]
        id_of = dict(zip(ok, ids))
        out = []
        for i, r in enumerate(records):
            assert r is not None
            if r.ok:
                self.metrics.decisions.inc(r.verdict or "none")
            else:
                self.metrics.backend_errors.inc()
            out.append(Outcome(record=r, decision_id=id_of.get(i)))
        return out

    def close(self) -> None:
        for thing in self.owned:
            try:
                thing.close()
            except Exception:  # noqa: BLE001 - best effort on shutdown
                log.debug("closing %r failed", thing, exc_info=True)


def build_service(config: ServeConfig, *, moderator: Moderator | None = None, store: DecisionStore | None = None) -> Service:
    """Load policies and the backend, open the store; raises on bad settings."""
    from icm.moderation.job import ModerateConfig, build_moderator

    owned: list[Any] = []
    if config.torch_threads and config.backend in ("hf", "cascade"):
        import torch

        torch.set_num_threads(config.torch_threads)
    if moderator is None:
        moderator = build_moderator(
            ModerateConfig(
                policy=config.policy, rules=config.rules, backend=config.backend, model=config.model,
                adapter=config.adapter, base_url=config.base_url, dtype=config.dtype, device=config.device,
                escalate_backend=config.escalate_backend, explain=config.explain,
                batch_size=config.max_batch_size if config.batching else 1,
            )
        )
        owned.append(moderator.backend)
        if moderator.escalate_to is not None:
            owned.append(moderator.escalate_to)
    policies: dict[str, Policy] = {moderator.policy.name: moderator.policy}
    for ref in config.policies:
        p = load_policy(ref)
        policies.setdefault(p.name, p)
    moderators: dict[tuple[str, str], Moderator] = {(moderator.policy.name, moderator.rule_set.name): moderator}
    for p in policies.values():
        for rs in p.rule_sets:
            moderators.setdefault(
                (p.name, rs.name),
                Moderator(
                    moderator.backend, policy=p, rules=rs.name, explain=moderator.explain,
                    escalate_to=moderator.escalate_to, max_new_tokens=moderator.max_new_tokens,
                ),
            )
    if store is None:
        store = DecisionStore(config.db_url())
        owned.append(store)
    image_dir = config.resolved_image_dir()
    return Service(
        config=config,
        policies=policies,
        moderators=moderators,
        store=store,
        images=ImageStore(image_dir) if image_dir is not None else None,
        auth=Authenticator(config.all_api_keys(), allow_unauthenticated=config.allow_unauthenticated),
        metrics=ServerMetrics(),
        owned=owned,
    )


# --------------------------------------------------------------------------- ASGI middleware


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413), by Content-Length or while reading."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    err = BodyTooLarge(self.limit)
                    await JSONResponse({"error": err.code, "detail": err.detail}, status_code=413)(scope, receive, send)
                    return
        seen = 0
        limit = self.limit

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


class _Metrics:
    """Count requests and time them per route template (bounded label values)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if scope.get("path", "").startswith("/static/") else "other")
            self.metrics.requests.inc(path, str(status))
            self.metrics.request_seconds.observe(time.perf_counter() - t0, path)


class _RateLimitHeaders:
    """Add ``RateLimit-Limit/-Remaining/-Reset`` to answers of rate-limited requests."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                state = (scope.get("state") or {}).get("ratelimit")
                if state is not None:
                    have = {k.lower() for k, _ in message.get("headers", [])}
                    extra = [(k.lower().encode(), v.encode()) for k, v in state.headers().items() if k.lower().encode() not in have]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_wrapper)


# --------------------------------------------------------------------------- the app


def create_app(
    config: ServeConfig | None = None,
    *,
    moderator: Moderator | None = None,
    store: DecisionStore | None = None,
) -> FastAPI:
    """The FastAPI app for ``config``; ``moderator`` / ``store`` replace the configured ones."""
    config = config or ServeConfig()
    svc = build_service(config, moderator=moderator, store=store)
    batch_size = config.max_batch_size if config.batching else 1
    wait_ms = config.max_wait_ms if config.batching else 0.0

    def on_batch(n: int, seconds: float) -> None:
        svc.metrics.batches.observe(n)
        svc.metrics.batch_seconds.observe(seconds)

    svc.batcher = DynamicBatcher(
        svc.process, max_batch_size=batch_size, max_wait_ms=wait_ms, max_queue=config.max_queue,
        max_queue_cost=config.max_queue_bytes, on_batch=on_batch,
    )
    svc.limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
    allowed_hosts = [*config.allowed_hosts, config.host]
    svc.metrics.queue._fn = lambda: float(svc.batcher.queue_depth if svc.batcher else 0)
    svc.metrics.info.set(__version__, svc.default_moderator.backend_name, svc.default_moderator.model_id)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        assert svc.batcher is not None
        await svc.batcher.start()
        svc.pixels = PixelBudget(
            config.decode_pixel_budget, max_waiting=config.max_queue, max_waiting_bytes=config.max_queue_bytes
        )
        purger = asyncio.create_task(_purge_loop(), name="icm-purge") if svc.images is not None else None
        log.info(
            "icm serve: policy %s, rules %s, backend %s, batching %s (max %d, %.1f ms), store %s",
            svc.config_policy_name, svc.default_rules, svc.default_moderator.backend_name,
            "on" if config.batching else "off", batch_size, wait_ms, svc.store.safe_url,
        )
        try:
            yield
        finally:
            if purger is not None:
                purger.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await purger
            await svc.batcher.stop()
            svc.close()

    async def _purge_loop() -> None:
        """Delete kept images past --keep-images-days at start, then every hour."""
        if not config.keep_images_days or svc.images is None:
            return
        every = min(3600.0, config.keep_images_days * 86400 / 4)
        while True:
            try:
                assert svc.batcher is not None  # in the worker thread: no image is written meanwhile
                n = await svc.batcher.run_exclusive(purge_kept_images, svc.store, svc.images, config.keep_images_days)
                if n:
                    log.info("deleted %d kept images older than %g days", n, config.keep_images_days)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.error("purging kept images failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(every)

    app = FastAPI(
        title="icm moderation service",
        version=__version__,
        description=(
            "Rule-based, explainable image moderation (ICM-Assistant). Send `Authorization: Bearer KEY` "
            "when the server has API keys. Every decision is stored; reviewers confirm or override "
            "them on the review page (`/review`)."
        ),
        lifespan=lifespan,
    )
    app.state.service = svc

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _exc: ClientDisconnect) -> Response:
        client = request.client.host if request.client else "unknown client"
        log.warning("%s disconnected during the upload to %s %s; nothing was moderated", client, request.method, request.url.path)
        svc.metrics.rejected.inc("client_disconnected")
        return Response(status_code=400)  # nobody reads it

    def principal(request: Request) -> str | None:
        client = request.client.host if request.client else None
        if "x-forwarded-for" in request.headers or "forwarded" in request.headers:
            client = None  # relayed by a proxy: the real client is not known to be local
        if not svc.auth.enabled:
            # Trust by network location must not extend to pages of other sites in the user's browser.
            host = request.headers.get("host")
            if not config.allow_unauthenticated and not host_allowed(host, allowed_hosts):
                raise APIError(
                    403, "host_not_allowed",
                    f"this server answers requests for this machine only, not for Host {(host or '')[:100]!r} "
                    "(DNS rebinding protection; add the name with --allowed-host, or configure API keys)",
                )
            why = cross_site(request.headers)
            if why is not None:
                raise APIError(
                    403, "cross_site_request",
                    f"refused a request from another site's page ({why}): without API keys only this server's "
                    "own pages and non-browser clients may call it",
                )
        who = svc.auth.principal(request.headers.get("authorization"), client)
        if svc.limiter is not None and request.url.path != "/metrics":
            try:
                state = svc.limiter.hit(f"key:{who}" if who else f"client:{client or 'unknown'}")
            except RateLimited as exc:
                svc.metrics.rejected.inc("rate_limited")
                raise APIError(
                    429, "rate_limited",
                    f"over the limit of {exc.state.limit} requests per minute; retry in {exc.state.reset} s",
                    headers={**exc.state.headers(), "Retry-After": str(exc.state.reset)},
                ) from None
            request.state.ratelimit = state
        return who

    # ------------------------------------------------------------------ moderation

    @app.post(
        "/v1/moderate",
        response_model=ModerateResponse,
        responses=ERRORS,
        openapi_extra=MODERATE_BODY,
        summary="Moderate one image",
        tags=["moderation"],
    )
    async def moderate(request: Request, who: str | None = Depends(principal)) -> ModerateResponse:
        """One image in, one stored decision out.

        The image comes as a multipart upload in the form field `image`, as JSON
        `{"image_base64": ...}` or `{"path": ...}` (a file inside the server's `--image-root`),
        or as the raw body with an `image/*` content type (`?policy=&rules=` in the query,
        its name in `X-Filename`). `policy` and `rules` choose the policy and rule set.
        """
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            data, name, policy, rules, source = await _from_multipart(request)
        elif ctype == "application/json":
            data, name, policy, rules, source = await _from_json(request)
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            data = await request.body()
            _check_size(len(data))
            name = _clean_name(request.headers.get("x-filename")) or "raw"
            policy, rules, source = request.query_params.get("policy"), request.query_params.get("rules"), "upload"
        else:
            raise APIError(
                415, "unsupported_content_type",
                f"send multipart/form-data with the image in the field '{IMAGE_FIELD}', JSON with "
                f"'image_base64' or 'path', or the image itself as image/* (got content type {ctype or 'none'!r})",
            )
        pname, rname = svc.resolve(policy, rules)
        t0 = time.perf_counter()
        assert svc.pixels is not None
        # Decoding holds its pixels (read from the header) of the server's budget, so many large
        # images decode a few at a time; an image over --max-pixels is refused without decoding.
        pixels = await run_in_threadpool(decode_weight, data, config.max_pixels, config.reduce_to_pixels)
        try:
            async with svc.pixels.hold(pixels, len(data)):
                im = await run_in_threadpool(_decode, data, name)
        except Overloaded as exc:
            svc.metrics.rejected.inc("overloaded")
            raise APIError(503, "overloaded", f"the server is busy: {exc}; retry later", headers={"Retry-After": "1"}) from None
        except ImageLoadError as exc:
            err = image_error(exc)
            if source == "path":  # a server-side file: say what is wrong, never what it contains
                err = APIError(err.status, err.code, f"{name!r} in the server's image folder: {err.code.replace('_', ' ')}")
            svc.metrics.rejected.inc(err.code)
            raise err from None
        load_ms = round((time.perf_counter() - t0) * 1000, 3)
        job = Job(
            image=im, data=data, policy=pname, rules=rname, load_ms=load_ms,
            meta=DecisionMeta(image_name=name, image_format=im.format, source=source, client=who),
        )
        assert svc.batcher is not None
        try:
            out = await svc.batcher.submit(job, cost=len(data) + loaded_bytes(im))
        except QueueFull as exc:
            raise APIError(503, "overloaded", f"the server is busy: {exc}; retry later", headers={"Retry-After": "1"}) from None
        except BatcherClosed as exc:
            raise APIError(503, "unavailable", str(exc), headers={"Retry-After": "5"}) from None
        except BackendConfigError as exc:  # a rejected key, an unknown model: no decision can be made
            log.error("the backend cannot work: %s", exc)
            raise APIError(
                503, "backend_unavailable", "the model backend is misconfigured or unreachable (see the server log)",
                headers={"Retry-After": "30"},
            ) from None
        except Exception as exc:  # noqa: BLE001 - the store (or the image folder) failed
            log.exception("batch failed: %s: %s", type(exc).__name__, exc)
            raise APIError(
                503, "store_failed", "the decision could not be made or stored (see the server log)",
                headers={"Retry-After": "5"},
            ) from None
        if out.decision_id is None:
            raise APIError(502, "backend_failed", out.record.error or "the backend gave no decision")
        return ModerateResponse(decision_id=out.decision_id, review_url=f"/review#decision={out.decision_id}", record=out.record)

    async def _from_multipart(request: Request) -> tuple[bytes, str, str | None, str | None, str]:
        try:
            form = await request.form(max_files=2, max_fields=16, max_part_size=64 * 1024)
        except (APIError, ClientDisconnect):
            raise
        except Exception as exc:  # noqa: BLE001 - starlette's parser errors
            raise APIError(400, "bad_multipart", f"the multipart body could not be parsed: {getattr(exc, 'detail', exc)}") from None
        upload = form.get(IMAGE_FIELD)
        if not isinstance(upload, UploadFile):
            files = [k for k, v in form.multi_items() if isinstance(v, UploadFile)]
            hint = f" (the request has a file in {', '.join(map(repr, files))})" if files else ""
            raise APIError(422, "missing_image", f"the image goes in the multipart form field '{IMAGE_FIELD}'{hint}")
        data = await upload.read(config.max_upload_bytes + 1)
        await upload.close()
        _check_size(len(data))
        name = _clean_name(upload.filename) or "upload"
        policy = form.get("policy")
        rules = form.get("rules")
        source = form.get("source")
        return (
            data, name,
            policy if isinstance(policy, str) and policy else None,
            rules if isinstance(rules, str) and rules else None,
            "page" if source == "page" else "upload",
        )

    async def _from_json(request: Request) -> tuple[bytes, str, str | None, str | None, str]:
        try:
            raw = await request.json()
        except (APIError, ClientDisconnect):
            raise
        except Exception as exc:  # noqa: BLE001
            raise APIError(400, "bad_json", f"the body is not valid JSON ({type(exc).__name__}: {exc})") from None
        try:
            body = ModerateJSON.model_validate(raw)
        except Exception as exc:  # noqa: BLE001
            raise APIError(422, "bad_request", f"invalid request: {exc}") from None
        if (body.image_base64 is None) == (body.path is None):
            raise APIError(422, "missing_image", "give exactly one of 'image_base64' and 'path'")
        if body.image_base64 is not None:
            text = body.image_base64.strip()
            if text.startswith("data:"):
                text = text.split(",", 1)[1] if "," in text else ""
            if len(text) > (config.max_upload_bytes + 2) * 4 // 3 + 4:
                raise APIError(413, "image_too_large", f"the image is over the {config.max_upload_bytes:,}-byte limit")
            try:
                data = base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, "bad_base64", "'image_base64' is not valid base64") from None
            _check_size(len(data))
            return data, _clean_name(body.filename) or "base64", body.policy, body.rules, "base64"
        data, rel = await run_in_threadpool(_read_root_file, body.path or "")
        return data, rel, body.policy, body.rules, "path"

    def _decode(data: bytes, name: str) -> LoadedImage:
        im = load_image(
            data, name=name, max_pixels=config.max_pixels, max_bytes=config.max_upload_bytes,
            draft_pixels=config.reduce_to_pixels or None,
        )
        return reduce_loaded(im, config.reduce_to_pixels)

    def _check_size(n: int) -> None:
        if n > config.max_upload_bytes:
            svc.metrics.rejected.inc("image_too_large")
            raise APIError(
                413, "image_too_large",
                f"the image is over the {config.max_upload_bytes:,}-byte upload limit",
            )

    def _read_root_file(path: str) -> tuple[bytes, str]:
        """Read a file beneath --image-root without a check-then-open race (see icm.serve.paths)."""
        if not config.image_root:
            raise APIError(403, "paths_disabled", "server-side paths are off: the server was started without --image-root")
        try:
            return read_beneath(config.image_root, path, config.max_upload_bytes)
        except PathRefused as exc:
            if exc.code == "image_too_large":
                svc.metrics.rejected.inc("image_too_large")
            raise APIError(exc.status, exc.code, exc.detail) from None

    # ------------------------------------------------------------------ policies

    @app.get("/v1/policies", responses=ERRORS, tags=["policies"], summary="Policies and rule sets this server applies")
    def policies(_who: str | None = Depends(principal)) -> dict[str, Any]:
        out = []
        for p in svc.policies.values():
            default_rules = svc.default_rules if p.name == svc.config_policy_name else p.rule_set().name
            labels = {rs.name: p.labels(rs) for rs in p.rule_sets}
            out.append({
                "name": p.name,
                "version": p.version,
                "description": p.description,
                "term": p.term.id,
                "question": p.term.question,
                "default_rules": default_rules,
                "attributes": [{"id": a.id, "question": a.question, "values": a.value_ids} for a in p.attributes],
                "rule_sets": [
                    {"name": rs.name, "audience": rs.audience, "description": rs.description,
                     "thresholds": rs.thresholds.model_dump()}
                    for rs in p.rule_sets
                ],
                "products": [
                    {"id": pr.id, "description": pr.description, "assignment": pr.assignment, "positive": pr.positive,
                     "labels": {name: lab[pr.id].verdict for name, lab in labels.items()}}
                    for pr in p.products
                ],
            })
        return {"default_policy": svc.config_policy_name, "default_rules": svc.default_rules, "policies": out}

    # ------------------------------------------------------------------ decisions and reviews

    @app.get("/v1/decisions", responses=ERRORS, tags=["review"], summary="Recent decisions, newest first")
    def decisions(
        limit: int = Query(50, ge=1, le=500),
        before_id: int | None = Query(None, ge=1, le=MAX_ID, description="Page: decisions with a smaller id"),
        verdict: Literal["allow", "review", "block"] | None = None,
        reviewed: bool | None = None,
        policy: str | None = None,
        _who: str | None = Depends(principal),
    ) -> dict[str, Any]:
        items = svc.store.list_decisions(limit=limit, before_id=before_id, verdict=verdict, reviewed=reviewed, policy=policy)
        return {"decisions": items, "total": svc.store.count_decisions()}

    @app.get("/v1/decisions/{decision_id}", responses=ERRORS, tags=["review"], summary="One decision with its reviews")
    def decision(decision_id: int = PathParam(ge=1, le=MAX_ID), _who: str | None = Depends(principal)) -> dict[str, Any]:
        d = svc.store.get_decision(decision_id)
        if d is None:
            raise APIError(404, "no_such_decision", f"no decision {decision_id}")
        d["image_url"] = f"/v1/images/{d['image_sha256']}" if d["image_kept"] and d["image_sha256"] else None
        return d

    @app.post(
        "/v1/decisions/{decision_id}/reviews", status_code=201, responses=ERRORS, tags=["review"],
        summary="Confirm or override a decision",
    )
    def review(
        body: ReviewIn, decision_id: int = PathParam(ge=1, le=MAX_ID), who: str | None = Depends(principal)
    ) -> dict[str, Any]:
        d = svc.store.get_decision(decision_id)
        if d is None:
            raise APIError(404, "no_such_decision", f"no decision {decision_id}")
        reviewer = (body.reviewer or "").strip() or who
        if not reviewer:
            raise APIError(422, "missing_reviewer", "say who reviews: give 'reviewer' (no API key identifies you)")
        if body.product is not None:
            p = svc.policies.get(d["policy"])
            if p is None:
                raise APIError(422, "unknown_policy", f"this server does not know the decision's policy {d['policy']!r}")
            if body.product not in p.product_map:
                raise APIError(422, "unknown_product", f"policy {p.name!r} has no product {body.product!r}")
        r = svc.store.add_review(
            decision_id, verdict=body.verdict, product=body.product, note=(body.note or "").strip() or None,
            reviewer=reviewer, api_key_name=who,
        )
        svc.metrics.reviews.inc(r["action"])
        return r

    @app.get(
        "/v1/images/{sha256}", responses={**ERRORS, 200: {"content": {"image/*": {}}}}, tags=["review"],
        summary="A kept image, by SHA-256", response_class=Response,
    )
    def image(sha256: str, _who: str | None = Depends(principal)) -> Response:
        if svc.images is None:
            raise APIError(404, "images_not_kept", "this server does not keep images (--no-keep-images)")
        try:
            data = svc.images.get(sha256.lower())
        except ValueError:
            data = None
        if data is None:
            raise APIError(404, "no_such_image", f"no kept image {sha256}")
        return Response(
            data, media_type=_media_type(data),
            headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"},
        )

    # ------------------------------------------------------------------ operations

    @app.get("/healthz", tags=["operations"], summary="Liveness and readiness")
    def healthz() -> JSONResponse:
        db_ok = svc.store.ping()
        running = svc.batcher is not None and svc.batcher.running
        body = {
            "status": "ok" if db_ok and running else "unavailable",
            "version": __version__,
            "policy": svc.config_policy_name,
            "rules": svc.default_rules,
            "backend": svc.default_moderator.backend_name,
            "model": svc.default_moderator.model_id,
            "database": "ok" if db_ok else "unreachable",
            "batching": {"enabled": config.batching, "max_batch_size": batch_size, "max_wait_ms": wait_ms},
            "auth": "api-keys" if svc.auth.enabled else "none (loopback only)" if not config.allow_unauthenticated else "none",
        }
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["operations"], summary="Prometheus metrics")
    def metrics(_who: str | None = Depends(principal)) -> PlainTextResponse:
        return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ review page

    if config.review_page:
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        def root() -> RedirectResponse:
            return RedirectResponse("/review")

        @app.get("/review", include_in_schema=False)
        def review_page() -> HTMLResponse:
            html = (STATIC_DIR / "review.html").read_text(encoding="utf-8")
            return HTMLResponse(
                html,
                headers={
                    "Content-Security-Policy": (
                        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
                    ),
                    "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-store",
                },
            )

    app.add_middleware(_BodyLimit, limit=config.max_upload_bytes * 4 // 3 + 1024 * 1024)
    app.add_middleware(_Metrics, metrics=svc.metrics)
    app.add_middleware(_RateLimitHeaders)
    return app


def _clean_name(name: str | None) -> str | None:
    """An uploaded file's base name, printable, at most 200 characters."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:200].strip()
    return base or None


def _media_type(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return FORMAT_MEDIA_TYPES.get(im.format or "", "application/octet-stream")
    except Exception:  # noqa: BLE001
        return "application/octet-stream"


def serve(config: ServeConfig) -> None:
    """Run the server (blocking) with uvicorn; refuses an unsafe bind first."""
    import uvicorn

    config.check_bind()
    if not logging.getLogger("icm").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
        logging.getLogger("icm").addHandler(handler)
        logging.getLogger("icm").setLevel(config.log_level.upper() if config.log_level.upper() in logging._nameToLevel else "INFO")
    app = create_app(config)
    svc: Service = app.state.service
    shown = "[::1]" if config.host == "::1" else config.host
    log.info(
        "http://%s:%d  review page /review, API docs /docs, decisions in %s%s",
        shown, config.port, svc.store.safe_url,
        f", images in {svc.images.root}" if svc.images is not None else "",
    )
    uvicorn.Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level=config.log_level,
            timeout_graceful_shutdown=30, proxy_headers=False,
            # requests beyond those the queues admit get uvicorn's 503 before their bodies are read
            limit_concurrency=2 * config.max_queue + 64,
        )
    ).run()
