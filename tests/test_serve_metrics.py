"""``/metrics`` in production (issue 21, item 5): under ``icm serve --workers 2`` every scrape
answers for the whole server (it alternated between the workers' own counts before),
decisions are counted by verdict, policy and rule set, the process metrics are there, and the
cascade publishes summable counters instead of a ratio gauge."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families

from icm.moderation.record import ModerationRecord

from serve_helpers import png

ADMIN, CLIENT = "admin-key-0123456789abcdef", "client-key-0123456789abcdef"
# (policy, rules) each request names, several times each: the labels the scrapes must show
TARGETS = [("icm-sexy", "icm-default"), ("icm-sexy", "general-audience"), ("gambling", "licensed-market")]


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(text: str, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(text) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.add(int(child))
    return out


@pytest.fixture
def two_workers(tmp_path: Path):
    """A real ``icm serve --workers 2`` on loopback, with an admin and a client key."""
    keys = tmp_path / "keys"
    keys.write_text(f"root:{ADMIN}:admin\ncarol:{CLIENT}:client\n")
    keys.chmod(0o600)
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("ICM_API_KEYS", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "icm.cli.main", "serve", "--workers", "2", "--port", str(port), "--log-level", "warning",
           "--db", str(tmp_path / "d.sqlite"), "--no-keep-images", "--api-key", str(keys), "--extra-policy", "gambling"]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"icm serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"icm serve did not come up:\n{log.read_text()}"
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200 and len(_workers(proc.pid)) == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this fixture started
            proc.wait()


def test_every_scrape_under_two_workers_gives_the_whole_servers_totals(two_workers) -> None:
    base, proc = two_workers
    sent: collections.Counter[tuple[str, str, str]] = collections.Counter()
    colours = [(220, 20, 20), (20, 20, 220), (240, 240, 240), (20, 160, 20)]
    n = 0
    for i in range(4):
        for policy, rules in TARGETS:
            # a connection per request, so the kernel spreads them over both workers
            r = httpx.post(base + "/v1/moderate", headers={"Authorization": f"Bearer {CLIENT}"}, timeout=60,
                           files={"image": (f"{i}.png", png(colours[i], (32 + i, 32)), "image/png")},
                           data={"policy": policy, "rules": rules})
            assert r.status_code == 200, r.text
            sent[(r.json()["record"]["verdict"] or "none", policy, rules)] += 1
            n += 1
    workers = _workers(proc.pid)
    assert len(workers) == 2
    time.sleep(1.5)  # each worker writes its queue depth and process metrics every second
    scrapes = []
    for _ in range(6):
        r = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert r.status_code == 200, r.text
        scrapes.append(r.text)
    for text in scrapes:
        assert total(text, "icm_decisions_total") == n
        for (verdict, policy, rules), count in sent.items():
            assert total(text, "icm_decisions_total", verdict=verdict, policy=policy, rules=rules) == count, (verdict, policy, rules)
        assert total(text, "icm_http_requests_total", route="/v1/moderate", status="200") == n
        assert total(text, "icm_batch_size_count") >= 1
        # one resident-memory series per live worker, labelled by its pid
        pids = {int(s.labels["pid"]) for s in samples(text) if s.name == "process_resident_memory_bytes"}
        assert pids == workers, (pids, workers)
        assert all(s.value > 1e6 for s in samples(text) if s.name == "process_resident_memory_bytes")
        assert total(text, "icm_queue_depth") == 0
        assert "icm_cascade_escalation_rate" not in text
    # /metrics is an admin's: no key 401, a client key 403
    assert httpx.get(base + "/metrics", timeout=10).status_code == 401
    assert httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {CLIENT}"}, timeout=10).status_code == 403


def test_two_worker_metrics_live_in_a_fresh_directory_removed_at_exit(two_workers) -> None:
    base, proc = two_workers
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).text
    assert total(text, "icm_decisions_total") == 0
    metrics_dir = _owner_env(proc)
    assert metrics_dir and Path(metrics_dir).is_dir() and any(Path(metrics_dir).glob("*.db")), metrics_dir
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=40)
    assert not Path(metrics_dir).exists()


def _owner_env(proc: subprocess.Popen) -> str:
    """PROMETHEUS_MULTIPROC_DIR as a worker of ``proc`` sees it."""
    for pid in _workers(proc.pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for item in env:
            if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return item.split(b"=", 1)[1].decode()
    return ""


def test_one_process_labels_decisions_and_has_the_process_metrics(tmp_path: Path, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from icm.moderation.engine import Moderator
    from icm.serve.app import create_app
    from icm.serve.config import ServeConfig

    from serve_helpers import ColourBackend

    monkeypatch.delenv("ICM_API_KEYS", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    cfg = ServeConfig(db=str(tmp_path / "d.sqlite"), allowed_hosts=["testserver"], policy="icm-sexy")
    app = create_app(cfg, moderator=Moderator(ColourBackend(), policy="icm-sexy"))
    with TestClient(app, client=("127.0.0.1", 50123)) as c:
        rules = [rs.name for rs in app.state.service.policies["icm-sexy"].rule_sets][:2]
        for rs in rules:
            r = c.post("/v1/moderate", files={"image": ("a.png", png((220, 20, 20)), "image/png")}, data={"rules": rs})
            assert r.status_code == 200, r.text
        text = c.get("/metrics").text
    for rs in rules:
        assert total(text, "icm_decisions_total", policy="icm-sexy", rules=rs) == 1
    assert total(text, "process_resident_memory_bytes") > 1e6
    assert total(text, "process_cpu_seconds_total") > 0


def test_the_cascade_publishes_counters_not_a_ratio(monkeypatch) -> None:
    from icm.moderation.engine import ESCALATED_NOTE
    from icm.serve.metrics import ServerMetrics

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    m = ServerMetrics()
    for escalated in (True, False, False, False):
        notes = [f"{ESCALATED_NOTE} test"] if escalated else []
        m.observe_stage(ModerationRecord.model_construct(stage="detector", notes=notes))
    m.observe_stage(ModerationRecord.model_construct(stage=None, notes=[]))  # not a cascade: not counted
    text = m.render()
    assert total(text, "icm_cascade_images_total") == 4
    assert total(text, "icm_cascade_escalated_total") == 1
    assert "icm_cascade_escalation_rate" not in text
