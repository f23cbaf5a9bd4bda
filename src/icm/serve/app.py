"""The HTTP service: ``create_app(ServeConfig)`` returns a FastAPI app over the engine.

The app is a thin layer over :class:`icm.moderation.engine.Moderator` (what
``icm.moderate`` runs): a route decodes the request's image with
:func:`icm.moderation.images.load_image` and queues it for the :class:`DynamicBatcher`,
whose single worker thread moderates a batch (:meth:`Service.process`: the model is asked
once per policy, each rule set decides) and commits its decisions to the
:class:`DecisionStore` before any of its requests is answered.

The routes live in :mod:`icm.serve.routes` (all ``/v1`` routes need
``Authorization: Bearer KEY`` when keys are configured):

* moderation: ``POST /v1/moderate`` (native) and ``POST /v1/moderations`` (OpenAI-compatible);
* review: ``GET /v1/decisions``, ``GET /v1/decisions/{id}``, ``POST /v1/decisions/{id}/reviews``,
  the review queue (``/v1/review-queue``...), ``GET /v1/images/{sha256}``, and the page ``/review``;
* admin: ``GET /v1/policies``, ``GET /healthz`` (liveness), ``GET /readyz`` (readiness: 200 once the
  backend has judged a warm-up image at start), ``GET /metrics`` (Prometheus);
* ``/docs``, ``/redoc`` and ``/openapi.json``: the OpenAPI spec, its pages served without a CDN
  (:mod:`icm.serve.docs_pages`, which also adds CORS for ``--cors-origin``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from icm import __version__
from icm.moderation.engine import Moderator
from icm.serve.auth import AuthThrottle
from icm.serve.batching import DynamicBatcher
from icm.serve.config import ServeConfig
from icm.serve.errors import APIError
from icm.serve.fetch import FetchPolicy, ImageFetcher
from icm.serve.limits import PixelBudget, RateLimiter
from icm.serve.logs import configure_logging
from icm.serve.service import Job, Outcome, Service, build_service
from icm.serve.store import DecisionStore, purge_kept_images
from icm.serve.store_idempotency import IdempotencyKeys
from icm.serve.webhooks import WebhookDispatcher

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.requests import ClientDisconnect
except ImportError as err:  # pragma: no cover
    raise ImportError(f"the server needs FastAPI ({err}): pip install 'icm-assistant[serve]'") from err

from icm.serve.docs_pages import install_cors, install_docs
from icm.serve.middleware import BodyLimit, RateLimitHeaders, RequestContext, RequestMetrics
from icm.serve.routes import admin, moderation, openai_moderations, review
from icm.serve.routes.review import STATIC_DIR

log = logging.getLogger("icm.serve")
OPENAI_PATH = "/v1/moderations"

__all__ = ["Job", "Outcome", "Service", "build_service", "create_app", "serve"]


def create_app(
    config: ServeConfig | None = None,
    *,
    moderator: Moderator | None = None,
    store: DecisionStore | None = None,
) -> FastAPI:
    """The FastAPI app for ``config``; ``moderator`` / ``store`` replace the configured ones."""
    config = config or ServeConfig()
    svc = build_service(config, moderator=moderator, store=store)
    if svc.auth.keys_without_role:
        log.warning(
            "roles are not set for the API keys %s: each has full access, as admin (moderate, review, read every "
            "decision and image, metrics). Give each key a role: NAME:KEY:ROLE, ROLE one of client, reviewer, admin "
            "(docs/security.md)", ", ".join(svc.auth.keys_without_role),
        )
    if config.cors_origins and not svc.auth.enabled:
        log.warning(
            "--cors-origin %s has no effect without API keys: a keyless server refuses every other site's page "
            "(cross_site_request); configure keys (docs/operations.md#cors)", ", ".join(config.cors_origins),
        )
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
    if config.auth_failures_per_minute:
        svc.extras["auth_throttle"] = AuthThrottle(config.auth_failures_per_minute)
    svc.extras["trusted_proxies"] = config.trusted_networks()
    svc.extras["fetcher"] = ImageFetcher(FetchPolicy(
        hosts=list(config.image_url_hosts), max_bytes=config.max_upload_bytes, timeout_s=config.image_url_timeout_s,
        max_redirects=config.image_url_max_redirects, private_networks=config.image_url_private_networks,
    ))
    svc.extras["idempotency"] = IdempotencyKeys(svc.store, window_s=config.idempotency_window_s)
    dispatcher = None
    if config.webhook_url and config.webhook_secret is not None:
        svc.store.webhooks = True
        dispatcher = WebhookDispatcher(
            svc.store, config.webhook_url, config.webhook_secret.get_secret_value(), metrics=svc.metrics,
            base_backoff_s=min(1.0, config.webhook_max_backoff_s), max_backoff_s=config.webhook_max_backoff_s,
        )
        svc.extras["wake_webhooks"] = dispatcher.wake
        svc.metrics.webhook_pending.set_function(lambda: float(svc.store.pending_events()))
    svc.metrics.review_queue.set_function(lambda: float(svc.store.queue_count()))
    svc.metrics.set_queue_depth(lambda: float(svc.batcher.queue_depth if svc.batcher else 0))
    svc.metrics.info.info(
        {"version": __version__, "backend": svc.default_moderator.backend_name, "model": svc.default_moderator.model_id}
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        assert svc.batcher is not None
        await svc.batcher.start()
        svc.pixels = PixelBudget(
            config.decode_pixel_budget, max_waiting=config.max_queue, max_waiting_bytes=config.max_queue_bytes
        )
        purger = asyncio.create_task(_purge_loop(svc), name="icm-purge") if svc.images is not None else None
        warmer = asyncio.create_task(_warm_up(svc), name="icm-warm-up")
        refresher = asyncio.create_task(_refresh_loop(svc), name="icm-metrics") if svc.metrics.multiprocess else None
        if dispatcher is not None:
            await dispatcher.start()
        log.info(
            "icm serve: policy %s, rules %s, backend %s, batching %s (max %d, %.1f ms), store %s",
            svc.config_policy_name, svc.default_rules, svc.default_moderator.backend_name,
            "on" if config.batching else "off", batch_size, wait_ms, svc.store.safe_url,
        )
        try:
            yield
        finally:
            for task in (warmer, purger, refresher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await svc.batcher.stop()
            if dispatcher is not None:
                await dispatcher.stop()
            svc.close()
            svc.metrics.worker_exit()

    app = FastAPI(
        title="icm moderation service",
        version=__version__,
        description=(
            "Rule-based, explainable image moderation (ICM-Assistant). Send `Authorization: Bearer KEY` "
            "when the server has API keys. Every decision is stored; reviewers confirm or override "
            "them on the review page (`/review`)."
        ),
        lifespan=lifespan,
        docs_url=None,  # install_docs: the same pages from local files, no CDN
        redoc_url=None,
    )
    app.state.service = svc
    install_docs(app)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if request.url.path == OPENAI_PATH:  # OpenAI's error shape, which its SDKs read
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            if exc.status in (401, 403):
                kind = "authentication_error" if exc.status == 401 else "permission_error"
            body = {"error": {"message": exc.detail, "type": kind, "param": exc.param, "code": exc.code}}
            return JSONResponse(body, status_code=exc.status, headers=exc.headers)
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, and a body that is not UTF-8 text made it a 500
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in exc.errors()[:10]
        )
        return await _api_error(request, APIError(422, "invalid_request", f"the request is not valid: {problems}"))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _exc: ClientDisconnect) -> Response:
        client = request.client.host if request.client else "unknown client"
        log.warning("%s disconnected during the upload to %s %s; nothing was moderated", client, request.method, request.url.path)
        svc.metrics.rejected.labels("client_disconnected").inc()
        return Response(status_code=400)  # nobody reads it

    app.include_router(moderation.router)
    app.include_router(openai_moderations.router)
    app.include_router(review.router)
    app.include_router(admin.router)
    if config.review_page:
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
        app.include_router(review.page_router)

    app.add_middleware(BodyLimit, limit=config.max_upload_bytes * 4 // 3 + 1024 * 1024)
    app.add_middleware(RequestMetrics, metrics=svc.metrics)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(RequestContext)  # every answer, errors included, carries the request id
    install_cors(app, config.cors_origins)  # outermost: answers preflights before the rest
    return app


async def _warm_up(svc: Service) -> None:
    """Judge a warm-up image in the batch worker (models load, exports run), then mark the
    service ready (``/readyz``); retried with backoff while the backend fails. Also purges
    idempotency keys past their window, hourly."""
    import time

    delay, t0 = 1.0, time.perf_counter()
    assert svc.batcher is not None
    while not svc.ready:
        try:
            if await svc.batcher.run_exclusive(svc.warm_up):
                svc.ready = True
                log.info("ready: the backend judged the warm-up image in %.1f s", time.perf_counter() - t0)
                break
        except Exception as exc:  # noqa: BLE001 - retried; /readyz stays 503 meanwhile
            log.error("warm-up failed: %s: %s; retrying in %.0f s", type(exc).__name__, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 60.0)
    keys: IdempotencyKeys = svc.extras["idempotency"]
    while True:
        try:
            await asyncio.to_thread(keys.purge)
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.error("purging idempotency keys failed: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(3600)


async def _purge_loop(svc: Service) -> None:
    """Delete kept images past --keep-images-days at start, then every hour."""
    config = svc.config
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


async def _refresh_loop(svc: Service, every_s: float = 1.0) -> None:
    """Several workers: write this worker's queue depth and process metrics for the others' scrapes."""
    while True:
        await asyncio.sleep(every_s)
        try:
            svc.metrics.refresh()
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.debug("refreshing the metrics failed: %s", exc)


def serve(config: ServeConfig) -> None:
    """Run the server (blocking) with uvicorn; refuses an unsafe bind first."""
    import uvicorn

    config.check_bind()
    if config.workers > 1:  # N processes on one socket (icm.serve.workers)
        from icm.serve.workers import serve_workers

        return serve_workers(config)
    configure_logging(config.log_level, config.log_format)
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
            # the access line is icm's (icm.serve.middleware.RequestContext: with the request id);
            # uvicorn's own records go to the root handler configure_logging set
            access_log=False, log_config=None,
            # requests beyond those the queues admit get uvicorn's 503 before their bodies are read
            limit_concurrency=2 * config.max_queue + 64,
        )
    ).run()
