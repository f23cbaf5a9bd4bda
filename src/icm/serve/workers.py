"""``icm serve --workers N``: N server processes on one port, each with its own model and batcher.

uvicorn's supervisor binds the socket once and starts N worker processes (spawned, not
forked, so no model or database connection is shared by accident); the kernel spreads
connections over them. Each worker builds the app from the same :class:`ServeConfig`,
passed through a private file (mode 0600, deleted when the supervisor stops) because it
holds the API keys and must not appear in ``ps``.

What the workers share is the decision store: give them a server database
(``--db postgresql+psycopg://...``). SQLite works too for a few workers on one machine
(WAL mode, writers wait their turn), but the review queue and rate limits are per process.
The metrics are the whole server's: the supervisor gives the workers a fresh
``PROMETHEUS_MULTIPROC_DIR`` (made before they spawn, deleted when it stops), each worker writes
its metrics there, and ``/metrics``, whichever worker answers, merges them (:mod:`icm.serve.metrics`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

from icm.serve.config import ServeConfig

CONFIG_ENV = "ICM_SERVE_WORKER_CONFIG"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # as icm.serve.metrics reads it (not imported here: no prometheus_client yet)


def _config_data(config: ServeConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    data["api_keys"] = [k.get_secret_value() for k in config.api_keys]
    data["workers"] = 1
    return data


def app_factory() -> Any:
    """The app of one worker (uvicorn calls this in each worker process)."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} is not set: this factory is for icm serve --workers")
    try:
        with open(path, encoding="utf-8") as fh:
            config = ServeConfig(**json.load(fh))
        return _build(config)
    except Exception as exc:  # noqa: BLE001 - a settings error: every restart would fail the same way
        # uvicorn's supervisor restarts a worker that died of any other exit status forever, holding
        # the port; STARTUP_FAILURE makes it stop, and the supervisor reports the reason it finds here.
        from uvicorn.config import STARTUP_FAILURE

        with contextlib.suppress(OSError), open(path + ".error", "x", encoding="utf-8") as fh:
            fh.write(f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ValueError, KeyError)) else str(exc))
        logging.getLogger("icm.serve").error("worker %d cannot start: %s", os.getpid(), exc)
        sys.exit(STARTUP_FAILURE)


def _build(config: ServeConfig) -> Any:
    from icm.serve.app import create_app
    from icm.serve.logs import configure_logging

    configure_logging(config.log_level, config.log_format)  # as icm serve does in one process
    return create_app(config)


def serve_workers(config: ServeConfig) -> None:
    """Run ``config.workers`` worker processes behind one socket (blocking)."""
    import uvicorn

    from icm.serve.store import DecisionStore

    # Migrate once here, before the workers start: N processes opening a new database at the
    # same moment would each try to create its tables (SQLite has no lock to order them).
    DecisionStore(config.db_url()).close()
    fd, path = tempfile.mkstemp(prefix="icm-serve-", suffix=".json")
    # a fresh directory for this start: counts of an earlier run (or another server) must not add up
    metrics_dir = tempfile.mkdtemp(prefix="icm-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the workers, before their prometheus_client import
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(_config_data(config), fh)
        os.environ[CONFIG_ENV] = path
        uvicorn.run(
            "icm.serve.workers:app_factory", factory=True, host=config.host, port=config.port, workers=config.workers,
            log_level=config.log_level, timeout_graceful_shutdown=30, proxy_headers=False,
            access_log=False, log_config=None,  # icm logs each request (with its id) in its own format
            limit_concurrency=2 * config.max_queue + 64,
        )
        with contextlib.suppress(FileNotFoundError), open(path + ".error", encoding="utf-8") as fh:
            raise ValueError(f"the workers could not start: {fh.read()}")
    finally:
        for leftover in (path, path + ".error"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
