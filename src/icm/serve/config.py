"""``ServeConfig``: everything ``icm serve`` takes, one field per command-line flag.

A config can also be read from a YAML file (``icm serve --config serve.yaml``) whose keys
are the field names; flags given on the command line win over the file. The backend and
its settings nest under ``backend:`` (a :class:`~icm.moderation.spec.BackendSpec`)::

    backend: {backend: openai, model: served-vlm, base_url: "http://127.0.0.1:8001/v1"}
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from icm.moderation.backends.registry import DEFAULT_BACKEND
from icm.moderation.spec import BackendSpec, all_flat_fields, fold_flat_settings

log = logging.getLogger("icm.serve")

API_KEYS_ENV = "ICM_API_KEYS"
Role = Literal["client", "reviewer", "admin"]
ROLES: tuple[Role, ...] = ("client", "reviewer", "admin")
"""What a key may do (see docs/security.md): client moderates and reads its own decisions and
images; reviewer works the review queue and reads every decision; admin does everything."""
DEFAULT_DB = "icm-decisions.sqlite"
MIN_KEY_LENGTH = 16
"""Shortest API key accepted: 16 random characters are beyond guessing over the network."""
KEYGEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
STANDARD_BUNDLE = "icm-standard"
OPENAI_MODEL_NAMES = ("omni-moderation-latest", "omni-moderation-2024-09-26", "text-moderation-latest", "text-moderation-stable")
"""OpenAI's moderation model names: each judges the images of the input under the icm-standard bundle."""


def flat_backend_keys() -> frozenset[str]:
    """Top-level keys of the flat form: the backend options (``icm serve``'s flags), but
    ``backend`` itself and ``batch_size`` (the server's is ``max_batch_size``)."""
    return frozenset(all_flat_fields()) - {"backend", "batch_size"}


class ServeConfig(BaseModel):
    """Settings of the moderation server; the CLI maps one flag to each field."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # no key in an error message

    # -- network
    host: str = Field("127.0.0.1", description="Interface to listen on. Without API keys only loopback is allowed.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    allow_unauthenticated: bool = Field(
        False, description="Listen on a non-loopback interface although no API key is configured."
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted API keys, 'NAME:KEY:ROLE' (ROLE: client, reviewer or admin; NAME is the key's "
        f"identity, recorded with decisions and reviews), each key at least {MIN_KEY_LENGTH} characters; 'NAME:KEY' "
        f"and 'KEY' (no role) have full access as admin. ${API_KEYS_ENV} (comma-separated) adds more.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Without API keys, Host header names accepted besides localhost, the loopback addresses "
        "and --host (refusing others defeats DNS rebinding). '*' accepts any.",
    )
    rate_limit: int = Field(
        0, ge=0, description="Requests per minute per API key (per client without keys) on /v1 routes; 0: no limit."
    )
    auth_failures_per_minute: int = Field(
        10, ge=0,
        description="Wrong API keys accepted per minute from one client address; beyond, its requests get 429 "
        "until the minute ends (0: no limit).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="CIDRs of reverse proxies whose X-Forwarded-For names the client address (for the "
        "failed-authentication limit); from any other peer the header is ignored.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins ('https://app.example.com', scheme://host[:port]) whose browser pages may call the API "
        "(CORS); '*' allows any. None by default: browsers keep other sites' pages from reading answers.",
    )
    # -- moderation
    policy: str = Field("icm-sexy", description="Default policy: a built-in name or a policy YAML file.")
    rules: str | None = Field(None, description="Default rule set of the default policy.")
    policies: list[str] = Field(
        default_factory=list, description="More policies clients may name per request (built-in names or YAML files)."
    )
    backend: BackendSpec = Field(
        default_factory=BackendSpec,
        description="The model backend and its settings: {backend: NAME, ...its options} (see icm.moderation.spec). "
        "The flat form of earlier versions (backend: hf, model: ..., at the top level) is read too, with a warning.",
    )
    explain: bool = Field(False, description="Ask the model for an explanation of every decision.")
    torch_threads: int | None = Field(
        None, ge=1,
        description="hf: CPU threads torch may use (default: torch's choice). On a busy CPU, 1 avoids "
        "OpenMP threads spinning against the server's own threads.",
    )
    workers: int = Field(
        1, ge=1, le=256,
        description="Server processes on the one port, each with its own model and batcher (icm.serve.workers); "
        "more than one needs a database they can share (PostgreSQL, or SQLite on one machine).",
    )
    # -- dynamic batching
    batching: bool = Field(True, description="Batch concurrent requests into one backend call.")
    max_batch_size: int = Field(8, ge=1, description="Most images per backend call.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the first request of a batch waits for company.")
    max_queue: int = Field(256, ge=1, description="Requests waiting beyond this are refused with 503.")
    max_queue_bytes: int = Field(
        1024 * 1024 * 1024, ge=1,
        description="Memory the requests waiting for the model may hold (their bytes and decoded pixels); "
        "beyond it they are refused with 503.",
    )
    # -- inputs
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest image accepted, in bytes.")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest image accepted, in pixels (width x height).")
    decode_pixel_budget: int = Field(
        50_000_000, ge=1,
        description="Pixels decoded at once over all requests (read from each image's header first); "
        "images beyond the budget wait their turn, and one larger than it decodes alone.",
    )
    reduce_to_pixels: int = Field(
        2048 * 2048, ge=0,
        description="Decoded images larger than this are reduced (integer box filter) before they wait for "
        "the model, which resizes to less anyway; 0 keeps every size.",
    )
    image_root: str | None = Field(
        None, description="Folder whose files clients may name by path; paths outside it are refused."
    )
    # -- decision store
    db: str = Field(DEFAULT_DB, description="SQLite file, or a SQLAlchemy URL (postgresql+psycopg://...).")
    keep_images: bool = Field(True, description="Keep each moderated image so reviewers can see it.")
    image_dir: str | None = Field(
        None, description="Where kept images go (default: '<db file>-images' beside a SQLite file)."
    )
    keep_images_days: float = Field(
        30.0, ge=0,
        description="Kept images older than this many days are deleted, at start and every hour; "
        "0 keeps them forever.",
    )
    # -- web
    review_page: bool = Field(True, description="Serve the review page at /review.")
    # -- the OpenAI-compatible endpoint (POST /v1/moderations)
    model_aliases: dict[str, str] = Field(
        default_factory=lambda: dict.fromkeys(OPENAI_MODEL_NAMES, STANDARD_BUNDLE),
        description="OpenAI model names and what they mean here: 'POLICY[:RULES][,POLICY[:RULES]...]', a bundle "
        "'BUNDLE[:RULES]' (OpenAI's names: the icm-standard taxonomy), or '' for the server's default policy and "
        "rule set.",
    )
    unjudged: Literal["pass", "flag"] = Field(
        "pass",
        description="/v1/moderations: a category the backend cannot judge here (the offline detector without "
        "evidence for a policy) is 'pass': not flagged, its category_applied_input_types empty; or 'flag': "
        "flagged on every image (fail closed).",
    )
    image_url_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs /v1/moderations fetches ('cdn.example.com', '*.example.com'); "
        "none by default (data: URLs only).",
    )
    image_url_timeout_s: float = Field(10.0, gt=0, description="Time limit of one image URL fetch, redirects included.")
    image_url_max_redirects: int = Field(3, ge=0, description="Redirects an image URL fetch follows (each one checked again).")
    image_url_private_networks: bool = Field(
        False,
        description="Let image URLs reach private, loopback and link-local addresses (only for an allow-listed "
        "host inside your own network; never needed for a public CDN).",
    )
    # -- the review queue
    audit_rate: float = Field(
        0.0, ge=0, le=1, description="Share of allow and block decisions also sent to the review queue for audit."
    )
    claim_seconds: float = Field(300.0, gt=0, description="How long a reviewer's claim on a queued decision lasts.")
    undo_seconds: float = Field(
        30.0, ge=0, le=3600, description="How long a reviewer may withdraw (undo) their own review; 0 turns undo off.",
    )
    # -- webhooks
    webhook_url: str | None = Field(
        None, description="POST an event here for each block decision and each reviewer's override (retried from the outbox)."
    )
    webhook_secret: SecretStr | None = Field(
        None, description="Key of the HMAC-SHA256 signature in X-ICM-Signature (needed with webhook_url)."
    )
    webhook_max_backoff_s: float = Field(300.0, gt=0, description="Longest wait between two delivery attempts of an event.")
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="Server log lines: 'text', or 'json' (one JSON object per line, with the request id)."
    )
    idempotency_window_s: float = Field(
        86400.0, gt=0,
        description="How long an Idempotency-Key of the moderation routes is remembered (its answer replayed), in seconds.",
    )

    @field_validator("api_keys")
    @classmethod
    def _keys_valid(cls, v: list[SecretStr]) -> list[SecretStr]:
        return [SecretStr(APIKey.parse(k.get_secret_value()).entry) for k in v]  # raises on a bad key

    @field_validator("webhook_secret")
    @classmethod
    def _secret_long(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().strip()) < MIN_KEY_LENGTH:  # as --webhook-secret requires
            raise ValueError(f"webhook_secret is shorter than {MIN_KEY_LENGTH} characters (make one with {KEYGEN_HINT})")
        return SecretStr(v.get_secret_value().strip()) if v is not None else None

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for entry in v:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry[:100]!r} is not an address or CIDR (10.0.0.0/8, ::1)") from None
        return [e.strip() for e in v]

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        out = []
        for entry in v:
            origin = entry.strip().rstrip("/")
            if origin != "*" and not re.fullmatch(r"https?://[^/\s?#]+", origin):
                raise ValueError(
                    f"cors_origins: {entry[:100]!r} is not an origin: write scheme://host[:port] "
                    "(https://app.example.com, no path) or '*'"
                )
            out.append(origin)
        return out

    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(e, strict=False) for e in self.trusted_proxies]

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_backend(cls, data: Any) -> Any:
        """Flat backend settings (``backend: hf``, ``model: ...`` at the top level, as the
        command line's flags are) become the nested spec; given with a nested spec, they win."""
        if not isinstance(data, dict):
            return data
        return fold_flat_settings(data, flat_backend_keys()) or data

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.webhook_url and not self.webhook_secret:
            raise ValueError("webhook_url needs webhook_secret (the receiver checks each event's HMAC-SHA256 signature)")
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"webhook_url must be an http(s) URL, not {self.webhook_url[:100]!r}")
        return self

    # -- derived ---------------------------------------------------------------------------

    def backend_spec(self) -> BackendSpec:
        """The backend to build: :attr:`backend`, its batch size the server's batches."""
        return BackendSpec.from_settings({**self.backend.flat(), "batch_size": self.max_batch_size if self.batching else 1})

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> ServeConfig:
        """The config in YAML file ``path``, ``overrides`` (flags; None: not given) winning.

        A file in the flat form of earlier versions (``backend: hf`` and ``model: ...`` at the
        top level) is read as the nested ``backend:`` mapping, with a warning.
        """
        import yaml

        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a serve config is a mapping of settings")
        flat_keys = flat_backend_keys()
        flat = sorted(k for k in data if k in flat_keys or (k == "backend" and isinstance(data[k], str)))
        if flat:
            log.warning(
                "%s: flat backend settings (%s) are deprecated; nest them: backend: {backend: %s, ...}",
                path, ", ".join(flat), data.get("backend") if isinstance(data.get("backend"), str) else DEFAULT_BACKEND,
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "backend" in given and isinstance(data.get("backend"), dict):  # --backend keeps the file's other settings
            nested = BackendSpec.model_validate(data.pop("backend")).flat()
            data.update({k: v for k, v in nested.items() if k in flat_keys})
        data.update(given)
        return cls.model_validate(data)

    def all_api_keys(self, environ: dict[str, str] | None = None) -> list[APIKey]:
        """The configured keys and those of ``$ICM_API_KEYS``; raises ValueError on a bad one."""
        env = os.environ if environ is None else environ
        raw = [k.get_secret_value() for k in self.api_keys]
        for entry in (env.get(API_KEYS_ENV) or "").split(","):
            if entry.strip():
                raw.append(entry)
        out: list[APIKey] = []
        for entry in raw:
            try:
                key = APIKey.parse(entry)
            except ValueError as exc:
                raise ValueError(f"{exc} (in --api-key, api_keys or ${API_KEYS_ENV})") from None
            if all(not hmac.compare_digest(key.secret.encode(), k.secret.encode()) for k in out):
                out.append(key)
        roles: dict[str, Role] = {}
        for key in out:  # two keys of one name (a rotation) are one identity: they need one role
            if roles.setdefault(key.name, key.effective_role) != key.effective_role:
                raise ValueError(
                    f"the API keys named {key.name!r} have different roles ({roles[key.name]}, {key.effective_role}): "
                    "a name is one identity (in --api-key, api_keys or $" + API_KEYS_ENV + ")"
                )
        return out

    def db_url(self) -> str:
        return db_url(self.db)

    def resolved_image_dir(self) -> Path | None:
        if not self.keep_images:
            return None
        if self.image_dir:
            return Path(self.image_dir)
        path = sqlite_path(self.db_url())
        if path is None:
            raise ValueError("keep_images with a non-SQLite database needs image_dir (--image-dir)")
        if path == ":memory:":
            raise ValueError("keep_images with an in-memory database needs image_dir (--image-dir)")
        return Path(path + "-images")

    def check_bind(self) -> None:
        """Refuse a non-loopback interface without API keys, unless told otherwise."""
        if self.all_api_keys() or self.allow_unauthenticated or is_loopback(self.host):
            return
        raise ValueError(
            f"refusing to listen on {self.host} without API keys: anyone who can reach it could use it. "
            f"Set {API_KEYS_ENV} or --api-key, listen on 127.0.0.1, or pass --allow-unauthenticated."
        )


@dataclass(frozen=True)
class APIKey:
    """An accepted key: ``name`` is recorded with decisions and reviews; ``key`` never leaves.

    ``role`` is None for an entry written without one (``NAME:KEY``, ``KEY``): such a key has
    full access, as ``admin``, and the server warns at start that roles are not set.
    """

    name: str
    key: SecretStr
    role: Role | None = None

    @property
    def effective_role(self) -> Role:
        return self.role or "admin"

    @classmethod
    def parse(cls, entry: str) -> APIKey:
        """'NAME:KEY:ROLE', 'NAME:KEY' or a bare 'KEY' (named after a short hash of itself).

        Refuses an empty secret ('alice:'), an empty name (':KEY'), a key shorter than
        :data:`MIN_KEY_LENGTH` and an unknown role; the messages name the key's NAME, never the key.
        """
        entry = entry.strip()
        if not entry:
            raise ValueError("an API key is empty")
        name, sep, secret = entry.partition(":")
        name, secret = name.strip(), secret.strip()
        role: Role | None = None
        if sep:
            if not name:
                raise ValueError("an API key entry ':KEY' has an empty NAME (write NAME:KEY:ROLE, or the key alone)")
            if ":" in secret:
                secret, _, given = secret.rpartition(":")
                secret, given = secret.strip(), given.strip()
                if given not in ROLES:
                    raise ValueError(
                        f"the API key entry for {name!r} has the role {given[:40]!r}: a role is one of "
                        f"{', '.join(ROLES)} (NAME:KEY:ROLE; a key cannot contain ':')"
                    )
                role = given  # checked against ROLES above
            if not secret:
                raise ValueError(f"the API key entry for {name!r} has an empty key after 'NAME:'")
            if any(ch.isspace() or not ch.isprintable() for ch in name) or len(name) > 100:
                raise ValueError(f"the API key NAME {name[:100]!r} must be printable, without spaces, at most 100 characters")
        else:
            secret = name
            name = "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]
        if any(ch.isspace() or not ch.isprintable() for ch in secret):
            raise ValueError(f"the API key {'for ' + repr(name) if sep else '(unnamed)'} contains spaces or unprintable characters")
        if len(secret) < MIN_KEY_LENGTH:
            raise ValueError(
                f"the API key {'for ' + repr(name) if sep else '(unnamed)'} is {len(secret)} characters: keys need at "
                f"least {MIN_KEY_LENGTH} (make one with {KEYGEN_HINT})"
            )
        return cls(name=name, key=SecretStr(secret), role=role)

    @property
    def secret(self) -> str:
        return self.key.get_secret_value()

    @property
    def entry(self) -> str:
        """The 'NAME:KEY[:ROLE]' form (for storage in the config; secret)."""
        return f"{self.name}:{self.secret}" + (f":{self.role}" if self.role else "")

    def matches(self, token: str) -> bool:
        return hmac.compare_digest(self.secret.encode(), token.encode())


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def db_url(db: str) -> str:
    """A SQLAlchemy URL for a file path or a URL."""
    if "://" in db:
        return db
    if db == ":memory:":
        return "sqlite://"
    return "sqlite:///" + os.path.abspath(os.path.expanduser(db))


def sqlite_path(url: str) -> str | None:
    """The file behind a SQLite URL (':memory:' for in-memory), None for other databases."""
    if not url.startswith("sqlite"):
        return None
    rest = url.split("://", 1)[1]
    if rest in ("", "/", "/:memory:"):
        return ":memory:"
    path = rest[1:] if rest.startswith("/") else rest
    return path.split("?", 1)[0]
