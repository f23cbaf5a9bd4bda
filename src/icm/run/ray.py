"""``icm moderate --engine ray``: the same records as the local engine, from a Ray Data actor pool.

The pipeline is: inputs -> a Ray dataset of rows (a path, or a table's path/URL/bytes) ->
``map_batches`` over an actor pool (``ActorPoolStrategy(size=N)``) whose actors each build
their own backend and :class:`~icm.moderation.engine.Moderator` in the constructor (nothing
heavy is pickled) -> record batches streamed back to the driver, whose
:class:`~icm.run.output.RecordSink` (the local engine's) writes them (JSONL, or parquet part
files with an explicit schema, see :mod:`icm.moderation.parquet`) and counts the summary.

Pitfalls this module avoids, each met on a 2-CPU machine:

* **a pipeline that waits forever**: with every CPU taken by actors at 1 CPU each, a read
  or write task never gets a CPU and Ray Data waits without an error. Path lists become
  the dataset in memory (no read step), a table's read tasks ask for a tenth of a CPU, the
  writing is done by the driver, and actors default to a share of the CPUs that leaves half
  a CPU free. A pool that cannot fit the cluster is refused with the arithmetic.
* **threads**: onnxruntime ignores ``OMP_NUM_THREADS``; each actor sets the detector's
  ``intra_op_num_threads`` and torch's threads itself (``--threads-per-actor``, default the
  actor's whole CPUs, at least 1), so N actors do not each start one thread per core.
* **resume**: the output is read first; an image whose previous record (same policy, rule
  set, backend and model) is complete and whose content hash is unchanged is skipped by the
  actor that would moderate it. Parquet parts are written atomically, so a driver killed at
  any moment leaves whole parts; a rerun ends with every image exactly once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from icm.moderation.backends.base import Backend
from icm.moderation.record import ModerationRecord
from icm.run.config import ModerateConfig
from icm.run.local import build_moderator, close_runner
from icm.run.output import JobSummary, RecordSink, RunIdentity, input_key, is_uri, record_key, resolved, sha256_file
from icm.run.preflight import Checked, check_policy

log = logging.getLogger(__name__)

RAY_HINT = "--engine ray needs Ray Data: pip install 'icm-assistant[ray]'"
TABLE_SUFFIXES = (".parquet", ".csv")
LISTING_SUFFIXES = (".txt", ".lst")
PATH_COLUMNS = ("path", "url", "uri", "image_path", "image_url", "file", "filename")
BYTES_COLUMNS = ("bytes", "image", "image_bytes", "data", "content")
RESERVED_CPUS = 0.5
"""CPUs the default actor size leaves for Ray Data's own tasks and the driver."""
READ_TASK_CPUS = 0.1
MAX_FETCH_BYTES = 256 * 1024 * 1024
RECORDS_KEPT = 1000
"""The summary holds the first records only (the CLI shows 50); all go to the output and ``on_record``."""


@dataclass
class RayOptions:
    """How the pool runs (``--address``, ``--num-actors``, ``--cpus-per-actor`` ...)."""

    address: str | None = None
    """An existing cluster (``auto``, ``ray://host:10001``, ``host:6379``); None starts a local one."""
    num_actors: int = 1
    cpus_per_actor: float | None = None
    """None: 1 CPU, or less when the pool would otherwise take every CPU (see :data:`RESERVED_CPUS`)."""
    gpus_per_actor: float = 0.0
    threads_per_actor: int | None = None
    """Intra-op threads of each actor's model (onnxruntime, torch); None: whole CPUs of the actor, at least 1."""
    num_cpus: int | None = None
    """Local cluster only: CPUs Ray may use (default: all of the machine's)."""
    part_size: int = 1000
    """Parquet output: records per part file (what a killed driver may have to redo)."""
    progress: bool | None = None
    """Ray Data's progress bars; None: when stderr is a terminal."""


class RayEngineError(ValueError):
    """A setting the Ray engine cannot run with (the message says which and why)."""


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(RAY_HINT) from exc
    return ray


def row_key(name: str) -> str:
    """The key resume matches an input by (see :func:`icm.run.output.input_key`)."""
    return input_key(name)


# --------------------------------------------------------------------------- reading


def fetch_uri(uri: str, *, max_bytes: int = MAX_FETCH_BYTES) -> bytes:
    """The bytes behind a URI: http(s) with urllib, anything else through pyarrow's filesystems (s3, gs, file ...)."""
    if uri.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(uri, timeout=60) as resp:
            data = resp.read(max_bytes + 1)
    else:
        from pyarrow import fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as fh:
            data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"over the {max_bytes:,}-byte limit")
    return bytes(data)


def _read_listing(name: str) -> list[str]:
    if is_uri(name):
        text = fetch_uri(name).decode("utf-8", "surrogateescape")
    else:
        text = Path(name).read_bytes().decode("utf-8", "surrogateescape")
    return [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]


def _pick(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[w] for w in wanted if w in lower), None)


@dataclass
class _Inputs:
    rows: list[dict[str, Any]]
    """Path rows (``path``) for the in-memory dataset; empty with a table."""
    errors: list[tuple[str, str]]
    """(source, why) of inputs that produced no image."""
    table: str | None = None
    path_column: str | None = None
    bytes_column: str | None = None


def resolve_inputs(inputs: list[str], *, stdin: TextIO | None = None, null: bool = False) -> _Inputs:
    """Split inputs into image rows, a table, and inputs that yield nothing.

    Files, folders, globs and ``-`` expand exactly as in the local job (same order, same
    path spelling, so the records match); a ``*.txt``/``*.lst`` file is a listing (one path
    or URI a line); a ``*.parquet``/``*.csv`` input (local or ``s3://``, ``gs://``) is a table
    with a path/URL column and/or a bytes column, and must be the only input.
    """
    from icm.moderation.inputs import iter_image_paths

    tables = [i for i in inputs if i.lower().rstrip("/").endswith(TABLE_SUFFIXES)]
    if tables:
        if len(inputs) > 1:
            raise RayEngineError(f"a table input ({tables[0]}) must be the only input; got {len(inputs)} inputs")
        return _Inputs(rows=[], errors=[], table=tables[0])
    rows: list[dict[str, Any]] = []
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add_uri(uri: str) -> None:
        if uri not in seen:
            seen.add(uri)
            rows.append({"path": uri})

    def add_local(names: list[str]) -> None:
        for e in iter_image_paths(names, stdin=stdin, null=null):
            if not e.ok or e.path is None:
                errors.append((e.source, e.error or "no image"))
            elif resolved(e.path) not in seen:  # a file reached twice is moderated once, as in the local job
                seen.add(resolved(e.path))
                rows.append({"path": str(e.path)})

    for raw in inputs:
        if raw.lower().endswith(LISTING_SUFFIXES) and (is_uri(raw) or Path(raw).is_file()):
            try:
                lines = _read_listing(raw)
            except (OSError, ValueError) as exc:
                errors.append((raw, f"cannot read the listing {raw}: {exc}"))
                continue
            for line in lines:
                add_uri(line) if is_uri(line) else add_local([line])
        elif is_uri(raw):
            add_uri(raw)
        else:
            add_local([raw])
    return _Inputs(rows=rows, errors=errors)


# --------------------------------------------------------------------------- the actor


class ModerateActor:
    """One member of the pool: builds its own backend and Moderator, then moderates batches.

    ``__call__`` takes a pyarrow batch (``path`` and/or ``data`` columns, renamed from the
    table's) and returns a pyarrow table with the record schema plus ``_skipped`` (resumed:
    nothing written) and ``_key`` columns the driver drops.
    """

    def __init__(
        self,
        config: ModerateConfig | dict[str, Any],
        threads: int,
        done: dict[str, str] | None = None,
        path_column: str | None = "path",
        bytes_column: str | None = None,
    ) -> None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        self.config = config if isinstance(config, ModerateConfig) else ModerateConfig(**config)
        self.mod = build_moderator(self.config)
        backends = [b for b in (self.mod.backend, self.mod.escalate_to) if b is not None]
        for backend in backends:
            backend.set_threads(threads)  # onnxruntime reads its own setting, not OMP_NUM_THREADS; torch too
        self.done = done or {}
        self.path_column = path_column
        self.bytes_column = bytes_column

    def _load(self, name: str, data: bytes | None) -> Any:
        from icm.moderation.images import DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS, load_image
        from icm.moderation.video import DEFAULT_FPS, load_media

        c = self.config
        max_pixels = c.max_pixels or DEFAULT_MAX_PIXELS
        if data is None:
            return load_media(name, max_pixels=max_pixels, max_frames=c.max_frames or DEFAULT_MAX_FRAMES, fps=c.fps or DEFAULT_FPS)
        return load_image(data, name=name, max_pixels=max_pixels, max_frames=c.max_frames or DEFAULT_MAX_FRAMES)

    def _is_done(self, key: str, name: str, data: bytes | None) -> bool:
        want = self.done.get(key)
        if want is None:
            return False
        have = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(Path(name))
        return have == want

    def moderate_rows(self, names: list[str | None], datas: list[bytes | None]) -> tuple[list[ModerationRecord | None], list[str]]:
        """Records for a batch of rows (None where a row was already done), and each row's resume key."""
        from icm.moderation.backends.base import BackendConfigError
        from icm.moderation.images import ImageLoadError

        keys: list[str] = []
        slots: list[ModerationRecord | int | None] = []
        loaded: list[Any] = []
        load_ms: list[float] = []
        for name, data in zip(names, datas, strict=True):
            t0 = time.perf_counter()
            if data is not None and not isinstance(data, bytes):
                data = bytes(data)
            if data is not None:
                name = name or f"<bytes sha256:{hashlib.sha256(data).hexdigest()}>"
            name = name or "<row without path or bytes>"
            key = record_key(name, self.mod.policy.name, self.mod.rule_set.name)
            keys.append(key)
            try:
                if data is None and is_uri(name):
                    data = fetch_uri(name)
                if self._is_done(key, name, data):
                    slots.append(None)
                    continue
                im = self._load(name, data)
            except ImageLoadError as exc:
                slots.append(self.mod.error_record(name, str(exc)))
                continue
            except (OSError, ValueError) as exc:
                slots.append(self.mod.error_record(name, f"cannot load image {name}: {exc}"))
                continue
            load_ms.append(round((time.perf_counter() - t0) * 1000, 3))
            slots.append(len(loaded))
            loaded.append(im)
        try:
            done = self.mod.moderate_loaded(loaded, load_ms)
        except BackendConfigError:
            raise  # a rejected key or unknown model stops the whole job, as in the local job
        except Exception:  # noqa: BLE001 - one image that breaks the batch must not take the others down
            done = []
            for im, ms in zip(loaded, load_ms, strict=True):
                try:
                    done.extend(self.mod.moderate_loaded([im], [ms]))
                except BackendConfigError:
                    raise
                except Exception as exc:  # noqa: BLE001 - this image's internal error is its record; the others go on
                    done.append(self.mod.error_record(im.source, f"internal error: {type(exc).__name__}: {exc}", im))
        records = [done[s] if isinstance(s, int) else s for s in slots]
        return records, keys

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from icm.moderation.parquet import records_table

        n = batch.num_rows
        names = batch.column(self.path_column).to_pylist() if self.path_column else [None] * n
        datas = batch.column(self.bytes_column).to_pylist() if self.bytes_column else [None] * n
        names = [None if v is None else os.fsdecode(v) if isinstance(v, bytes) else str(v) for v in names]
        records, keys = self.moderate_rows(names, datas)
        placeholder = self.mod.error_record("<skipped>", "skipped")
        table = records_table([r if r is not None else placeholder for r in records])
        table = table.append_column("_skipped", pa.array([r is None for r in records], type=pa.bool_()))
        return table.append_column("_key", pa.array([os.fsencode(k) for k in keys], type=pa.binary()))  # any file name

    def identity(self) -> RunIdentity:
        return RunIdentity.of(self.mod)


def _identity_task(config: ModerateConfig) -> RunIdentity:
    mod = build_moderator(config)
    try:
        return RunIdentity.of(mod)
    finally:
        close_runner(mod)


# --------------------------------------------------------------------------- the driver


def plan_resources(opts: RayOptions, cluster_cpus: float, *, reading: bool = False) -> tuple[float, int]:
    """CPUs per actor and threads per actor for ``opts`` on a cluster of ``cluster_cpus``; refuses a pool that cannot run.

    The default gives each actor 1 CPU, or ``(cpus - reserve) / N`` when N actors at 1 CPU
    would leave less than the reserve to Ray Data's other tasks (the wait-forever case): half
    a CPU, or a whole one when a table is read (Ray's file listing task asks for 1 CPU).
    """
    reserve = 1.0 if reading else RESERVED_CPUS
    floor = 1.0 if reading else READ_TASK_CPUS
    if opts.num_actors < 1:
        raise RayEngineError("--num-actors must be at least 1")
    if opts.cpus_per_actor is not None and opts.cpus_per_actor < 0:
        raise RayEngineError("--cpus-per-actor must not be negative")
    if opts.gpus_per_actor < 0:
        raise RayEngineError("--gpus-per-actor must not be negative")
    cpus = opts.cpus_per_actor
    if cpus is None:
        cpus = min(1.0, max(0.05, (cluster_cpus - reserve) / opts.num_actors))
        cpus = round(cpus, 2)
    need = cpus * opts.num_actors
    if need > cluster_cpus + 1e-9:
        raise RayEngineError(
            f"{opts.num_actors} actors x {cpus:g} CPUs = {need:g} CPUs, but the cluster has {cluster_cpus:g}: "
            "the pool would never start (lower --num-actors or --cpus-per-actor)"
        )
    if need > cluster_cpus - floor + 1e-9:
        raise RayEngineError(
            f"{opts.num_actors} actors x {cpus:g} CPUs take all {cluster_cpus:g} CPUs of the cluster and leave none "
            "for reading and writing, where Ray Data waits forever without an error: "
            f"give the actors at most {cluster_cpus - reserve:g} CPUs in all (e.g. --cpus-per-actor "
            f"{max(0.05, (cluster_cpus - reserve) / opts.num_actors):.2g})"
        )
    threads = opts.threads_per_actor if opts.threads_per_actor is not None else max(1, int(cpus))
    if threads < 1:
        raise RayEngineError("--threads-per-actor must be at least 1")
    return cpus, threads


def _init_ray(ray: Any, opts: RayOptions) -> bool:
    """Connect to or start a cluster; True when this call started (and so must end) it."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if opts.address:
        ray.init(address=opts.address, **kwargs)
    else:
        ray.init(num_cpus=opts.num_cpus, **kwargs)
    return True


def run_ray_job(
    c: ModerateConfig,
    opts: RayOptions | None = None,
    *,
    stdin: TextIO | None = None,
    on_start: Callable[[int], None] | None = None,
    on_record: Callable[[ModerationRecord], None] | None = None,
    info: RunInfo | None = None,
) -> JobSummary:
    """Run ``icm moderate`` on Ray Data; the same records as :func:`icm.run.local.run_job`.

    Output ``c.out``: ``*.parquet`` (a folder of part files) or JSONL; the summary's
    ``records`` are the first :data:`RECORDS_KEPT` (every record goes to the output and to
    ``on_record``). Raises
    :class:`RayEngineError` for a pool that cannot run, :class:`ImportError` without Ray,
    and :class:`~icm.moderation.backends.base.BackendConfigError` when a backend refuses
    its settings (the records written so far stay; rerun with ``resume``).
    """
    opts = opts or RayOptions()
    ray = _ray()
    t0 = time.perf_counter()
    inputs = resolve_inputs(list(c.inputs), stdin=stdin, null=c.null)
    started = _init_ray(ray, opts)
    sink: RecordSink | None = None
    try:
        cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
        cpus, threads = plan_resources(opts, cluster_cpus, reading=inputs.table is not None)
        ctx = ray.data.DataContext.get_current()
        show = opts.progress if opts.progress is not None else os.isatty(2)
        ctx.enable_progress_bars = show
        config = c.model_copy(update={"inputs": [], "out": None, "resume": False})  # what the actors need (pickled)
        env_vars = {v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        env_vars.update(forwarded_environment(c))
        identity = ray.get(
            ray.remote(_identity_task).options(
                num_cpus=min(cpus, 1.0) or 0.05, num_gpus=opts.gpus_per_actor, runtime_env={"env_vars": env_vars}
            ).remote(config)
        )
        if info is not None:
            info.update(identity)
        sink = RecordSink(c.out, [identity], resume=c.resume, part_size=opts.part_size, keep=RECORDS_KEPT, on_record=on_record)
        summary = sink.summary
        path_col: str | None = "path"
        bytes_col: str | None = None
        if inputs.table is not None:
            ds = _read_table(ray, inputs.table)
            cols = list(ds.columns())
            path_col, bytes_col = _pick(cols, PATH_COLUMNS), _pick(cols, BYTES_COLUMNS)
            if path_col is None and bytes_col is None:
                raise RayEngineError(
                    f"{inputs.table}: no image column: name one of {', '.join(PATH_COLUMNS)} (paths or URLs) "
                    f"or {', '.join(BYTES_COLUMNS)} (image bytes); it has {', '.join(cols)}"
                )
            ds = ds.select_columns([x for x in (path_col, bytes_col) if x])
            total = None
        else:
            # paths as bytes: a name that is not UTF-8 (kept as surrogates) is no valid Arrow string
            ds = ray.data.from_items([{"path": os.fsencode(r["path"])} for r in inputs.rows]) if inputs.rows else None
            total = len(inputs.rows) + len(inputs.errors)
        if on_start and not show:  # Ray's own progress bars report instead when they are on
            on_start(total if total is not None else 0)
        for source, why in inputs.errors:
            summary.total += 1
            sink.emit(identity.error_record(source, why))
        if ds is not None:
            ds = ds.map_batches(
                ModerateActor,
                fn_constructor_kwargs={
                    "config": config, "threads": threads, "done": sink.index.hashes(),
                    "path_column": path_col, "bytes_column": bytes_col,
                },
                batch_size=c.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=opts.num_actors),
                num_cpus=cpus,
                num_gpus=opts.gpus_per_actor or None,
                runtime_env={"env_vars": env_vars},
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                skipped = batch.column("_skipped").to_pylist()
                keys = [os.fsdecode(k) for k in batch.column("_key").to_pylist()]
                texts = batch.column("record").to_pylist()
                for was_skipped, key, text in zip(skipped, keys, texts, strict=True):
                    summary.total += 1
                    if was_skipped:
                        sink.skip([sink.index.done[key]])
                        continue
                    sink.emit(ModerationRecord.model_validate_json(text))
    except Exception as exc:  # re-raised: Ray's wrapper exception gives way to the error it carries
        cause = _unwrap(exc)
        if cause is not exc:
            raise cause from None
        raise
    finally:
        if sink is not None:
            sink.close()
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    return summary


FORWARDED_ENV = ("ICM_OPENAI_API_KEY", "OPENAI_API_KEY", "ICM_OPENAI_BASE_URL", "OPENAI_BASE_URL", "HF_TOKEN", "HF_HOME")


def forwarded_environment(c: ModerateConfig) -> dict[str, str]:
    """The driver's variables the actors' backends read (API key and URL, Hugging Face), set in
    their ``runtime_env``: workers on other machines do not see the driver's environment.
    (Ray shows a job's runtime environment on its dashboard: keep the dashboard private.)"""
    names = list(FORWARDED_ENV)
    if env := getattr(c.backend, "api_key_env", None):
        names.append(env)
    return {n: os.environ[n] for n in names if n in os.environ}


def _read_table(ray: Any, table: str) -> Any:
    try:
        if table.lower().rstrip("/").endswith(".csv"):
            return ray.data.read_csv(table, num_cpus=READ_TASK_CPUS)
        return ray.data.read_parquet(table, num_cpus=READ_TASK_CPUS)
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise RayEngineError(f"cannot read the table {table}: {exc}") from None


def _unwrap(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError, ...), e.g. a BackendConfigError from an actor."""
    from icm.moderation.backends.base import BackendConfigError

    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, (BackendConfigError, RayEngineError)):
            return cur
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else cur.__cause__
        seen += 1
    return exc


class _NoBackend(Backend):  # the driver's stand-in: the actors hold the backend
    name = "ray"


class RunInfo:
    """What the CLI shows of a Ray run before the cluster is reached: the policy and rule set,
    checked on the driver without loading a model (the actors build the backend); ``backend_name``
    and ``model_id`` are filled in from the actors once the run starts."""

    def __init__(self, c: ModerateConfig, checked: Checked | None = None) -> None:
        checked = checked or check_policy(c)
        if checked.policy is None or checked.rule_set is None:
            raise ValueError("a bundle runs on the local engine (--engine local)")
        self.policy = checked.policy
        self.rule_set = checked.rule_set
        self.backend_name: str = c.backend.backend
        self.model_id: str | None = getattr(c.backend, "model", None)
        self.backend = _NoBackend()
        self.escalate_to = None

    def update(self, identity: RunIdentity) -> None:
        self.backend_name, self.model_id = identity.backend, identity.model
