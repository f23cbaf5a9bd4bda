"""`icm moderate --engine ray`: the local job's records from a Ray Data actor pool.

One Ray cluster for the whole module (starting Ray takes seconds on a small machine); the
kill-and-rerun test's drivers join it by address, as a user's driver joins a cluster.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.job import ModerateConfig, run_job
from icm.moderation.parquet import (
    COLUMNS,
    ParquetRecordWriter,
    read_any_records,
    read_parquet_records,
    record_schema,
    records_table,
)
from icm.moderation.ray_engine import RayEngineError, RayOptions, plan_resources, resolve_inputs
from icm.moderation.record import ModerationRecord

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
runner = CliRunner()
VOLATILE = {"timings", "created_at"}


def make_images(folder: Path, n: int, *, broken: bool = True) -> list[Path]:
    """``n`` varied pictures (skin-toned and not, shapes, sizes), a multi-frame GIF, and broken files."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        w, h = 40 + (i * 7) % 50, 40 + (i * 11) % 40
        im = Image.new("RGB", (w, h), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        d = ImageDraw.Draw(im)
        d.ellipse((i % 9, i % 7, w - 3, h - 2), fill=(220, 170 - i % 60, 140 - i % 50))
        p = folder / f"img{i:04d}.png" if i % 3 else folder / f"img{i:04d}.jpg"
        im.save(p)
        out.append(p)
    frames = [Image.new("RGB", (32, 32), c) for c in ((10, 10, 10), (230, 180, 150), (0, 0, 200))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    out.append(folder / "anim.gif")
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
        (folder / "text.jpg").write_text("hello, I am not an image\n")
        out += [folder / "broken.png", folder / "text.jpg"]
    return out


def stable(r: ModerationRecord) -> dict:
    return {k: v for k, v in json.loads(r.model_dump_json()).items() if k not in VOLATILE}


# --------------------------------------------------------------------------- without Ray


def test_default_pool_leaves_cpus_for_reading_and_refuses_one_that_waits_forever():
    # the probe's hang: 2 actors at 1 CPU each on 2 CPUs, nothing left for a read task
    with pytest.raises(RayEngineError, match="leave none for reading and writing"):
        plan_resources(RayOptions(num_actors=2, cpus_per_actor=1), 2)
    with pytest.raises(RayEngineError, match="would never start"):
        plan_resources(RayOptions(num_actors=3, cpus_per_actor=1), 2)
    cpus, threads = plan_resources(RayOptions(num_actors=2), 2)
    assert cpus * 2 <= 2 - 0.5 and threads == 1
    assert plan_resources(RayOptions(num_actors=2), 16) == (1.0, 1)
    # reading a table: Ray's file-listing task wants a whole CPU, so the default leaves one
    assert plan_resources(RayOptions(num_actors=2), 2, reading=True) == (0.5, 1)
    with pytest.raises(RayEngineError, match="leave none"):
        plan_resources(RayOptions(num_actors=2, cpus_per_actor=0.75), 2, reading=True)
    assert plan_resources(RayOptions(num_actors=2, cpus_per_actor=4), 16) == (4, 4)
    assert plan_resources(RayOptions(num_actors=1, cpus_per_actor=4, threads_per_actor=2), 16) == (4, 2)


def test_parquet_schema_is_explicit_when_errors_are_all_null_or_nested_fields_empty(tmp_path):
    ok = ModerationRecord(path="a.png", sha256="0" * 64, policy="p", rules="r", backend="b", verdict="allow", p_violation=0.1)
    failed = ModerationRecord(path="b.png", policy="p", rules="r", backend="b", error="cannot load image b.png: broken")
    t = records_table([ok])  # no error anywhere: the column still is a string, not null
    assert t.schema.equals(record_schema()) and t.schema.field("error").type == pa.string()
    assert t.column_names == list(COLUMNS)
    w = ParquetRecordWriter(tmp_path / "o.parquet", part_size=1)
    w.write(ok)
    w.write(failed)
    w.close()
    whole = pq.read_table(tmp_path / "o.parquet")  # pyarrow reads the folder as one table
    assert sorted(whole.column("path").to_pylist()) == ["a.png", "b.png"]
    assert whole.schema.field("p_violation").type == pa.float64()
    back, bad = read_parquet_records(tmp_path / "o.parquet")
    assert bad == 0 and sorted((r.path, r.error) for r in back) == [("a.png", None), ("b.png", failed.error)]
    # a damaged part counts as unreadable instead of stopping the read
    (tmp_path / "o.parquet" / "part-zzz.parquet").write_bytes(b"PAR1 torn")
    assert len(read_any_records(tmp_path / "o.parquet")[0]) == 2 and read_any_records(tmp_path / "o.parquet")[1] == 1


def test_inputs_listing_uris_and_tables(tmp_path):
    imgs = make_images(tmp_path / "imgs", 3, broken=False)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{imgs[0]}\n{tmp_path / 'imgs'}\ns3://bucket/x.jpg\n{tmp_path / 'missing.png'}\n")
    got = resolve_inputs([str(listing)])
    paths = [r["path"] for r in got.rows]
    assert paths[0] == str(imgs[0]) and "s3://bucket/x.jpg" in paths
    assert len(paths) == len(set(paths)) == 5  # the folder's copy of imgs[0] is not taken twice
    assert [why for _, why in got.errors] == [f"no such file or folder: {tmp_path / 'missing.png'}"]
    assert resolve_inputs(["in.parquet"]).table == "in.parquet"
    with pytest.raises(RayEngineError, match="only input"):
        resolve_inputs(["in.csv", "x.png"])


def test_local_job_writes_and_resumes_parquet(tmp_path):
    make_images(tmp_path / "imgs", 6)
    out = tmp_path / "local.parquet"
    r = runner.invoke(app, ["moderate", str(tmp_path / "imgs"), "--out", str(out)])
    assert r.exit_code == 1, r.output  # the broken files are error records
    records, bad = read_any_records(out)
    assert bad == 0 and len(records) == 9 and sum(not x.ok for x in records) == 2
    r = runner.invoke(app, ["moderate", str(tmp_path / "imgs"), "--out", str(out), "--resume"])
    assert "skipped (already in" in r.output
    again, _ = read_any_records(out)
    assert sorted(x.path for x in again) == sorted(x.path for x in records)  # failed ones retried, not doubled


# --------------------------------------------------------------------------- on Ray

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of 2 CPUs for the module; its address lets subprocess drivers join."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory, cluster):
    folder = tmp_path_factory.mktemp("ray") / "imgs"
    make_images(folder, 60)
    local = run_job(ModerateConfig(inputs=[str(folder)], batch_size=4))
    return folder, {r.path: r for r in local.records}


def test_ray_gives_the_local_records_parquet_and_jsonl(cluster, images, tmp_path):
    from icm.moderation.ray_engine import run_ray_job

    folder, local = images
    out = tmp_path / "out.parquet"
    s = run_ray_job(ModerateConfig(inputs=[str(folder)], batch_size=4, out=str(out)), RayOptions(num_actors=2))
    assert s.total == len(local) == 63 and s.errors == 2 and s.skipped == 0
    records, bad = read_parquet_records(out)
    assert bad == 0 and sorted(r.path for r in records) == sorted(local)
    for r in records:
        assert stable(r) == stable(local[r.path]), r.path
    assert {r.path: r.error for r in records if not r.ok} == {p: x.error for p, x in local.items() if not x.ok}
    anim = next(r for r in records if r.path.endswith("anim.gif"))
    assert anim.frames_seen == 3 and len(anim.frame_scores) == 3
    table = pq.read_table(out)
    assert table.schema.equals(record_schema())
    assert table.column("p_violation").to_pylist() == [json.loads(x)["p_violation"] for x in table.column("record").to_pylist()]
    # icm eval icm reads the parquet folder as it reads JSONL
    from icm.evaluation.results import read_results

    jsonl = tmp_path / "out.jsonl"
    s2 = run_ray_job(ModerateConfig(inputs=[str(folder)], batch_size=8, out=str(jsonl)), RayOptions(num_actors=1))
    assert s2.total == 63
    from_pq, from_jsonl = read_results(out), read_results(jsonl)

    def key(rs):
        return sorted((i.id, i.verdict, i.p_violation, i.error) for i in rs.items)

    assert key(from_pq) == key(from_jsonl) and len(from_pq.items) == 63


def test_ray_keeps_a_name_that_is_not_utf8_as_the_local_job_does(cluster, tmp_path):
    """A folder with one file whose name is not UTF-8 (Latin-1 bytes): the whole run used to
    abort with UnicodeEncodeError; now its record is the local job's (path shown as \\xNN,
    path_bytes exact), and --resume finds it done."""
    from icm.moderation.ray_engine import run_ray_job

    folder = tmp_path / "names"
    make_images(folder, 2, broken=False)
    odd = os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.png")
    Image.new("RGB", (30, 20), (200, 120, 90)).save(odd, format="PNG")
    local = {r.local_path(): r for r in run_job(ModerateConfig(inputs=[str(folder)], batch_size=4)).records}
    out = tmp_path / "out.jsonl"
    s = run_ray_job(ModerateConfig(inputs=[str(folder)], batch_size=2, out=str(out)), RayOptions(num_actors=1))
    assert s.total == 4 and s.errors == 0
    got = {r.local_path(): r for r in s.records}
    assert set(got) == set(local) and odd in got
    assert got[odd].path_bytes == local[odd].path_bytes is not None and stable(got[odd]) == stable(local[odd])
    again = run_ray_job(ModerateConfig(inputs=[str(folder)], batch_size=2, out=str(out), resume=True), RayOptions(num_actors=1))
    assert again.skipped == 4


def test_ray_reads_tables_of_bytes_and_of_paths(cluster, images, tmp_path):
    from icm.moderation.ray_engine import run_ray_job

    _, local = images
    chosen = sorted(p for p in local if p.endswith((".png", ".jpg")))[:12]
    table = pa.table({"path": chosen, "bytes": [Path(p).read_bytes() for p in chosen]})
    pq.write_table(table, tmp_path / "in.parquet")
    s = run_ray_job(ModerateConfig(inputs=[str(tmp_path / "in.parquet")], batch_size=4, out=str(tmp_path / "a.parquet")))
    got = {r.path: r for r in read_parquet_records(tmp_path / "a.parquet")[0]}
    assert s.total == 12 and set(got) == set(chosen)
    for p in chosen:
        assert (got[p].sha256, got[p].verdict, got[p].p_violation, got[p].error) == (
            local[p].sha256, local[p].verdict, local[p].p_violation, local[p].error), p
    # a CSV listing paths (what a user exports from a database), with a missing file
    with open(tmp_path / "in.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image_path"])
        for i, p in enumerate([*chosen[:3], str(tmp_path / "gone.png")]):
            w.writerow([i, p])
    s = run_ray_job(ModerateConfig(inputs=[str(tmp_path / "in.csv")], batch_size=2))
    by = {r.path: r for r in s.records}
    assert any(not local[p].ok for p in chosen[:3])  # broken.png sorts early: a per-image failure from bytes too
    assert s.total == 4 and s.errors == 1 + sum(not local[p].ok for p in chosen[:3])
    assert "no such file" in (by[str(tmp_path / "gone.png")].error or "")
    assert all(by[p].p_violation == local[p].p_violation for p in chosen[:3])


DRIVER = """
import sys
from icm.moderation.job import ModerateConfig
from icm.moderation.ray_engine import RayOptions, run_ray_job
run_ray_job(ModerateConfig(inputs=[sys.argv[2]], batch_size=2, out=sys.argv[3]),
            RayOptions(address=sys.argv[1], num_actors=1, part_size=8, progress=False))
"""


def test_driver_killed_mid_run_then_resumed_has_every_image_once(cluster, images, tmp_path):
    folder, local = images
    out = tmp_path / "killed.parquet"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, cluster, str(folder), str(out)], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the driver finished before it could be killed:\n" + (tmp_path / "driver.log").read_text()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before, bad = read_parquet_records(out)
    assert bad == 0 and 16 <= len(before) < len(local), len(before)
    r = runner.invoke(
        app, ["moderate", "--engine", "ray", "--address", cluster, str(folder), "--out", str(out), "--resume", "--batch-size", "4"]
    )
    assert r.exit_code == 1, r.output  # the two broken files
    assert "skipped (already in" in r.output
    after, bad = read_parquet_records(out)
    paths = [x.path for x in after]
    assert bad == 0 and len(paths) == len(set(paths)) == len(local), "every image exactly once"
    for x in after:
        assert stable(x) == stable(local[x.path]), x.path
    # what the first run finished was not redone
    done_before = {x.path: x.created_at for x in before if x.ok}
    assert all(x.created_at == done_before[x.path] for x in after if x.path in done_before)


def test_openai_backend_in_the_actors_gets_the_drivers_key_and_url(cluster, images, tmp_path, monkeypatch):
    """The MLLM recipe: the openai backend inside the actors against a served model. The
    cluster started before these variables were set, so the actors see them only because
    the driver forwards them in the runtime environment."""
    pytest.importorskip("fastapi")
    from icm.moderation.ray_engine import run_ray_job

    from fake_openai import MODEL, fake_openai_server

    _, local = images
    chosen = sorted(p for p in local if local[p].ok)[:6]
    with fake_openai_server() as (fake, url):
        monkeypatch.setenv("ICM_OPENAI_BASE_URL", url)
        monkeypatch.setenv("ICM_OPENAI_API_KEY", "sk-forwarded-to-the-actors")
        config = dict(inputs=chosen, backend="openai", model=MODEL, batch_size=3)
        here = {r.path: r for r in run_job(ModerateConfig(**config)).records}
        on_ray = run_ray_job(ModerateConfig(**config), RayOptions(num_actors=1))
        assert fake.requests and all(
            r["headers"].get("authorization") == "Bearer sk-forwarded-to-the-actors" for r in fake.requests)
    assert on_ray.errors == 0 and sorted(r.path for r in on_ray.records) == sorted(chosen)
    for r in on_ray.records:
        assert r.model == f"{MODEL}@{url}" and stable(r) == stable(here[r.path]), r.path


def test_an_actor_killed_mid_run_is_restarted_and_no_image_is_lost_or_doubled(cluster, images, tmp_path):
    psutil = pytest.importorskip("psutil")

    from icm.moderation.ray_engine import run_ray_job

    folder, local = images
    out = tmp_path / "actor.parquet"
    killed: list[int] = []

    def kill_an_actor(_r: ModerationRecord) -> None:
        if killed:
            return
        # the actor's worker process, among this test's own descendants (the module's cluster)
        for p in psutil.Process().children(recursive=True):
            try:
                title = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "MapWorker" in title and "ModerateActor" in title:
                os.kill(p.pid, signal.SIGKILL)  # mid-run: the actor holds a batch or will get one
                killed.append(p.pid)
                return

    s = run_ray_job(ModerateConfig(inputs=[str(folder)], batch_size=2, out=str(out)), RayOptions(num_actors=1),
                    on_record=kill_an_actor)
    assert killed, "no actor was found to kill"
    records, bad = read_parquet_records(out)
    paths = [r.path for r in records]
    assert bad == 0 and s.total == len(local) and len(paths) == len(set(paths)) == len(local)
    for r in records:
        assert stable(r) == stable(local[r.path]), r.path


# --------------------------------------------------------------------------- one output for both engines (issue 22)


def test_local_and_ray_write_the_same_records_and_resume_from_each_others_output(cluster, images, tmp_path):
    """Both engines write through one sink with one record identity: the records are the same,
    and either engine's --resume finds the other's finished records done (the failed ones, the
    two broken files, are tried again and not doubled)."""
    from icm.run.local import run_job as local_run
    from icm.run.ray import run_ray_job

    folder, local = images
    n_ok = sum(r.ok for r in local.values())
    # local JSONL, then Ray resumes it
    out = tmp_path / "local.jsonl"
    assert local_run(ModerateConfig(inputs=[str(folder)], batch_size=4, out=str(out))).total == 63
    first = {r.path: r for r in read_any_records(out)[0]}
    again = run_ray_job(ModerateConfig(inputs=[str(folder)], batch_size=4, out=str(out), resume=True), RayOptions(num_actors=1))
    assert (again.total, again.skipped, again.errors) == (63, n_ok, 2)
    after = read_any_records(out)[0]
    assert len(after) == len({r.path for r in after}) == 63
    assert all(r.created_at == first[r.path].created_at for r in after if r.ok)  # kept, not redone
    # Ray parquet, then the local engine resumes it
    pq_out = tmp_path / "ray.parquet"
    s = run_ray_job(ModerateConfig(inputs=[str(folder)], batch_size=4, out=str(pq_out)), RayOptions(num_actors=2))
    assert s.total == 63
    written = {r.path: r for r in read_parquet_records(pq_out)[0]}
    assert {p: stable(r) for p, r in written.items()} == {p: stable(r) for p, r in first.items()}
    resumed = local_run(ModerateConfig(inputs=[str(folder)], batch_size=4, out=str(pq_out), resume=True))
    assert (resumed.total, resumed.skipped, resumed.errors) == (63, n_ok, 2)
    assert len(read_parquet_records(pq_out)[0]) == 63


def test_ray_counts_answers_read_from_text_as_the_local_engine_does(cluster, tmp_path, monkeypatch):
    """The run's summary is counted by the one sink: a server without logprobs gives records
    whose answers were read from the text, and the Ray engine's summary (and so icm moderate's
    "read from text" line) counts them as the local engine's does, on a fresh run and on --resume."""
    pytest.importorskip("fastapi")
    from icm.moderation.spec import BackendSpec
    from icm.run.local import run_job as local_run
    from icm.run.ray import run_ray_job

    from fake_openai import MODEL, Reply, fake_openai_server, text_body
    from square_policy import square_policy

    policy = tmp_path / "text-check.yaml"
    policy.write_text(square_policy("text-check"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 24), (220, 20 + i, 20)).save(imgs / f"red{i}.png")
    with fake_openai_server() as (fake, url):
        fake.script("term", Reply(json=text_body("The answer is yes.")))
        fake.script("hue", Reply(json=text_body("The answer is (B).")))
        monkeypatch.setenv("ICM_OPENAI_API_KEY", "sk-test")

        def config(out: Path, resume: bool = False) -> ModerateConfig:
            return ModerateConfig(inputs=[str(imgs)], policy=str(policy), out=str(out), resume=resume,
                                  backend=BackendSpec.build(backend="openai", model=MODEL, base_url=url))

        here = local_run(config(tmp_path / "a.jsonl"))
        there = run_ray_job(config(tmp_path / "b.jsonl"), RayOptions(num_actors=1))
        resumed = run_ray_job(config(tmp_path / "a.jsonl", resume=True), RayOptions(num_actors=1))
    assert (here.text_records, here.text_answers) == (3, 6)
    assert (there.text_records, there.text_answers) == (3, 6)
    assert resumed.skipped == 3 and (resumed.text_records, resumed.text_answers) == (3, 6)
