"""`icm serve` (the HTTP service and review page) and `icm data export-reviews`.

Each `icm serve` flag sets the :class:`icm.serve.ServeConfig` field of the same name;
``--config FILE`` reads the fields from YAML first and flags given on the command line win.
"""

from __future__ import annotations

from typing import Any

import typer
from pydantic import SecretStr

from icm.cli import backend_options as bo
from icm.cli.common import err_console, print_error


def _missing_extra(exc: ImportError) -> None:
    print_error(f"{exc}")
    raise typer.Exit(2)


def serve(
    config: str | None = typer.Option(None, "--config", "-c", help="YAML file of settings (ServeConfig fields); flags win."),
    host: str | None = typer.Option(None, help="Interface to listen on (default: 127.0.0.1). Without API keys only loopback is allowed."),
    port: int | None = typer.Option(None, help="TCP port (default: 8000)."),
    allow_unauthenticated: bool | None = typer.Option(
        None, "--allow-unauthenticated",
        help="Listen beyond loopback without API keys (only behind your own auth).",
    ),
    api_key: list[str] | None = typer.Option(
        None, "--api-key",
        help=(
            "Where accepted API keys are: a FILE (one NAME:KEY:ROLE a line, ROLE client, reviewer or admin; # comments) or env:VARIABLE "
            "(comma-separated); repeatable. Never the key itself (argv is visible to every user). $ICM_API_KEYS adds more."
        ),
    ),
    allowed_host: list[str] | None = typer.Option(
        None, "--allowed-host",
        help="Without API keys: a Host name to accept besides localhost and the loopback addresses (repeatable).",
    ),
    rate_limit: int | None = typer.Option(None, help="Requests per minute per API key (per client without keys); 0: no limit (default)."),
    auth_failures_per_minute: int | None = typer.Option(
        None, help="Wrong API keys accepted per minute from one client address, then 429 (default 10; 0: no limit)."),
    trusted_proxy: list[str] | None = typer.Option(
        None, "--trusted-proxy",
        help="CIDR of a reverse proxy whose X-Forwarded-For names the client (repeatable); other peers' header is ignored."),
    cors_origin: list[str] | None = typer.Option(
        None, "--cors-origin",
        help="An origin (https://app.example.com) whose browser pages may call the API (repeatable; '*': any). Default: none."),
    policy: str | None = typer.Option(None, "--policy", "-p", help="Default policy: built-in name or YAML file (default: icm-sexy)."),
    rules: str | None = typer.Option(None, "--rules", "-r", help="Default rule set of the default policy."),
    policies: list[str] | None = typer.Option(None, "--extra-policy", help="Another policy clients may name per request (repeatable)."),
    backend: bo.BackendOpt = None,
    model: bo.ModelOpt = None,
    adapter: bo.AdapterOpt = None,
    base_url: bo.BaseUrlOpt = None,
    dtype: bo.DtypeOpt = None,
    device: bo.DeviceOpt = None,
    escalate_backend: bo.EscalateBackendOpt = None,
    min_label_mass: bo.MinLabelMassOpt = None,
    text_confidence: bo.TextConfidenceOpt = None,
    guided_choice: bo.GuidedChoiceOpt = None,
    api_key_env: bo.ApiKeyEnvOpt = None,
    timeout: bo.TimeoutOpt = None,
    max_retries: bo.MaxRetriesOpt = None,
    preset: bo.PresetOpt = None,
    threads: bo.ThreadsOpt = None,
    explain: bool | None = typer.Option(None, "--explain/--no-explain", help="Ask the model to explain every decision."),
    torch_threads: int | None = typer.Option(None, help="hf: CPU threads for torch (default: torch's choice; 1 on a busy CPU)."),
    batching: bool | None = typer.Option(None, "--batching/--no-batching", help="Dynamic batching of concurrent requests (default: on)."),
    max_batch_size: int | None = typer.Option(None, help="Most images per backend call (default: 8)."),
    max_wait_ms: float | None = typer.Option(None, help="How long a request waits for others to batch with (default: 5)."),
    max_queue: int | None = typer.Option(None, help="Requests allowed to wait; more get 503 (default: 256)."),
    max_queue_bytes: int | None = typer.Option(None, help="Memory waiting requests may hold, in bytes; more get 503 (default: 1 GiB)."),
    decode_pixel_budget: int | None = typer.Option(None, help="Pixels decoded at once over all requests (default: 50,000,000)."),
    reduce_to_pixels: int | None = typer.Option(None, help="Reduce decoded images larger than this for the model; 0 keeps sizes (default: 4,194,304)."),
    max_upload_bytes: int | None = typer.Option(None, help="Largest image in bytes (default: 20 MiB)."),
    max_pixels: int | None = typer.Option(None, help="Largest image in pixels (default: 40,000,000)."),
    image_root: str | None = typer.Option(None, help="Folder clients may name files in (JSON 'path'); off by default."),
    db: str | None = typer.Option(None, help="Decision store: SQLite file or SQLAlchemy URL (default: icm-decisions.sqlite)."),
    keep_images: bool | None = typer.Option(None, "--keep-images/--no-keep-images", help="Keep images for the review page (default: keep)."),
    image_dir: str | None = typer.Option(None, help="Where kept images go (default: '<db>-images')."),
    keep_images_days: float | None = typer.Option(
        None,
        help="Delete kept images older than this many days, at start and hourly; 0 keeps them forever (default: 30).",
    ),
    purge_only: bool = typer.Option(False, "--purge-only", help="Delete kept images past --keep-images-days, then exit without serving."),
    review_page: bool | None = typer.Option(None, "--review-page/--no-review-page", help="Serve the review page at /review (default: on)."),
    log_level: str | None = typer.Option(None, help="uvicorn log level (default: info)."),
    log_format: str | None = typer.Option(
        None, "--log-format", help="text, or json: one JSON object per line (time, level, request id, route, status...).",
    ),
    idempotency_window: float | None = typer.Option(
        None, "--idempotency-window", help="Seconds an Idempotency-Key's answer is replayed (default: 86400).",
    ),
    workers: int | None = typer.Option(
        None, "--workers",
        help="Server processes on this port, each with its own model (default: 1); share a PostgreSQL --db between them.",
    ),
    image_url_host: list[str] | None = typer.Option(
        None, "--image-url-host",
        help=(
            "/v1/moderations: a host whose http(s) image URLs are fetched ('cdn.example.com', '*.example.com'; "
            "repeatable). Default: none (data: URLs only)."
        ),
    ),
    model_alias: list[str] | None = typer.Option(
        None, "--model-alias",
        help=(
            "/v1/moderations: NAME=POLICY[:RULES][,...] or NAME=BUNDLE[:RULES] maps a model name to policies "
            "(repeatable; OpenAI's names such as omni-moderation-latest are the icm-standard bundle by default)."
        ),
    ),
    unjudged: str | None = typer.Option(
        None, "--unjudged",
        help=(
            "/v1/moderations: a category the backend cannot judge here (the offline detector without evidence for a "
            "policy) is 'pass' (not flagged, category_applied_input_types empty; the default) or 'flag' (fail closed)."
        ),
    ),
    audit_rate: float | None = typer.Option(None, help="Share of allow and block decisions sent to the review queue for audit (default: 0)."),
    claim_seconds: float | None = typer.Option(None, help="How long a reviewer's claim on a queued item lasts (default: 300)."),
    undo_seconds: float | None = typer.Option(None, help="How long reviewers may withdraw their own review (default: 30; 0: never)."),
    webhook_url: str | None = typer.Option(None, help="POST signed events (block decisions, overrides) to this URL, retried until accepted."),
    webhook_secret: str | None = typer.Option(None, help="Where the webhooks' HMAC key is: a FILE or env:VARIABLE (never the key itself)."),
) -> None:
    """Serve moderation over HTTP (POST /v1/moderate), store every decision, and the review page."""
    try:
        from icm.serve.app import serve as run
        from icm.serve.config import ServeConfig
    except ImportError as exc:
        _missing_extra(exc)
    given: dict[str, Any] = {
        "host": host, "port": port, "allow_unauthenticated": allow_unauthenticated,
        "api_keys": None, "allowed_hosts": list(allowed_host) if allowed_host else None, "rate_limit": rate_limit,
        "auth_failures_per_minute": auth_failures_per_minute, "trusted_proxies": list(trusted_proxy) if trusted_proxy else None,
        "cors_origins": list(cors_origin) if cors_origin else None,
        "policy": policy, "rules": rules,
        "policies": list(policies) if policies else None, "backend": backend, "model": model, "adapter": adapter,
        "base_url": base_url, "dtype": dtype, "device": device, "escalate_backend": escalate_backend,
        "min_label_mass": min_label_mass, "text_confidence": text_confidence, "guided_choice": guided_choice, "api_key_env": api_key_env,
        "timeout": timeout, "max_retries": max_retries, "preset": preset, "threads": threads,
        "explain": explain, "torch_threads": torch_threads, "batching": batching, "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
        "max_queue": max_queue, "max_queue_bytes": max_queue_bytes, "decode_pixel_budget": decode_pixel_budget,
        "reduce_to_pixels": reduce_to_pixels, "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels,
        "image_root": image_root, "db": db, "keep_images": keep_images, "image_dir": image_dir,
        "keep_images_days": keep_images_days,
        "review_page": review_page, "log_level": log_level, "log_format": log_format,
        "idempotency_window_s": idempotency_window, "workers": workers,
        "image_url_hosts": list(image_url_host) if image_url_host else None, "model_aliases": None,
        "unjudged": unjudged,
        "audit_rate": audit_rate, "claim_seconds": claim_seconds, "undo_seconds": undo_seconds, "webhook_url": webhook_url, "webhook_secret": None,
    }
    try:
        if api_key:
            given["api_keys"] = [k for source in api_key for k in read_key_source(source)]
        if webhook_secret:
            given["webhook_secret"] = read_secret_source(webhook_secret, "--webhook-secret")
        if model_alias:
            given["model_aliases"] = dict(ServeConfig.model_fields["model_aliases"].get_default(call_default_factory=True))
            for entry in model_alias:
                name, sep, target = entry.partition("=")
                if not sep or not name.strip():
                    raise ValueError(f"--model-alias {entry!r}: write NAME=POLICY[:RULES][,POLICY[:RULES]...]")
                given["model_aliases"][name.strip()] = target.strip()
        if config:
            cfg = ServeConfig.from_file(config, **given)
        else:
            cfg = ServeConfig(**{k: v for k, v in given.items() if v is not None})
        if purge_only:
            _purge(cfg)
            return
        cfg.check_bind()
    except (ValueError, OSError) as exc:
        print_error(f"icm serve: {exc}")
        raise typer.Exit(2) from None
    try:
        run(cfg)
    except (ValueError, KeyError) as exc:  # bad policy / rules / backend settings
        print_error(f"icm serve: {exc}")
        raise typer.Exit(2) from None


def read_key_source(source: str) -> list[SecretStr]:
    """The API keys in a file (one a line, '#' comments) or in ``env:VARIABLE`` (comma-separated).

    A key given on the command line would be readable by every user of the machine (``ps``,
    /proc) and kept in shell history, so ``--api-key`` names where keys are instead.
    """
    import os
    from pathlib import Path

    if source.startswith("env:"):
        var = source[4:]
        value = os.environ.get(var)
        if not var or value is None:
            raise ValueError(f"--api-key env:{var}: no such environment variable")
        keys = [k.strip() for k in value.split(",") if k.strip()]
        where = f"environment variable {var}"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(
                "--api-key takes a file of keys or env:VARIABLE, not a key: no file by that name "
                "(a key on the command line is visible to every user in ps and kept in shell history)"
            )
        keys = [
            line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        where = f"file {path}"
        if os.name == "posix" and path.stat().st_mode & 0o077:
            err_console.print(f"[yellow]warning: {path} is readable by other users; chmod 600 it[/yellow]")
    if not keys:
        raise ValueError(f"--api-key: the {where} holds no key")
    return [SecretStr(k) for k in keys]


def read_secret_source(source: str, flag: str) -> SecretStr:
    """A secret from ``env:VARIABLE`` or the first line of a file (never from argv, which every user sees)."""
    import os
    from pathlib import Path

    if source.startswith("env:"):
        value = os.environ.get(source[4:])
        if not source[4:] or value is None:
            raise ValueError(f"{flag} {source}: no such environment variable")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"{flag} takes a file or env:VARIABLE, not the secret itself: no file by that name")
        value = next((ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
    if len(value.strip()) < 16:
        raise ValueError(f"{flag}: the secret is empty or shorter than 16 characters")
    return SecretStr(value.strip())


def _purge(cfg: Any) -> None:
    from icm.serve.store import DecisionStore, ImageStore, purge_kept_images

    image_dir = cfg.resolved_image_dir()
    if image_dir is None:
        err_console.print("images are not kept (--no-keep-images): nothing to purge")
        return
    if not cfg.keep_images_days:
        err_console.print("--keep-images-days is 0 (keep forever): nothing purged")
        return
    store = DecisionStore(cfg.db_url())
    try:
        n = purge_kept_images(store, ImageStore(image_dir), cfg.keep_images_days)
    finally:
        store.close()
    err_console.print(f"deleted {n} kept images older than {cfg.keep_images_days:g} days from {image_dir}")


def export_reviews(
    db: str = typer.Option("icm-decisions.sqlite", help="The server's decision store (SQLite file or URL)."),
    out: str = typer.Option(..., "--out", "-o", help="JSONL file of training records."),
    image_dir: str | None = typer.Option(None, help="The server's kept images (default: '<db>-images')."),
    image_root: str | None = typer.Option(None, help="The server's --image-root, for decisions made on server-side paths."),
    policy: list[str] | None = typer.Option(None, "--policy", "-p", help="YAML file of a custom policy the decisions used (repeatable)."),
    overrides_only: bool = typer.Option(False, "--overrides-only", help="Only decisions a reviewer overrode."),
) -> None:
    """Turn reviewers' confirmations and overrides into training records (JSONL) for continued tuning."""
    try:
        from icm.serve.export import export_reviews as run
    except ImportError as exc:
        _missing_extra(exc)
    try:
        s = run(db, out, image_dir=image_dir, image_root=image_root, policies=policy or (), overrides_only=overrides_only)
    except Exception as exc:  # noqa: BLE001 - unreadable database, bad policy file
        print_error(f"icm data export-reviews: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    err_console.print(
        f"{s.written} training records ({s.overrides} overrides, {s.confirmations} confirmations) -> {s.out}"
    )
    if s.skipped_no_image:
        err_console.print(f"[yellow]{s.skipped_no_image} reviewed decisions skipped: their image was not kept[/yellow]")
    if s.unknown_policies:
        err_console.print(
            f"[yellow]unknown policies {', '.join(s.unknown_policies)}: their records hold only the verdict turn "
            "(give the policy files with --policy)[/yellow]"
        )
