"""The container recipe (Dockerfile, compose.yaml, deploy/prometheus.yml), checked statically.

No Docker daemon runs on the machines this project is developed on and base images cannot
be pulled, so the image is never built here (.ci/run builds it where `docker info` works).
These tests hold the recipe to what docs/operations.md promises: a multi-stage build that
installs as the README does (constraints.txt, extras that exist), a non-root user, a
health check on /readyz, and a compose file whose services are wired to each other.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, its instructions) in order."""
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for word, args in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if word == "FROM":
            m = re.search(r"\s+AS\s+(\S+)\s*$", args, re.IGNORECASE)
            stages.append((m.group(1) if m else str(len(stages)), []))
        elif stages:
            stages[-1][1].append((word, args))
    return stages


def _compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))


def _pip_installs(stage: list[tuple[str, str]]) -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN lines of a stage."""
    out = []
    for word, args in stage:
        if word != "RUN":
            continue
        for part in re.split(r"&&|;", args):
            tokens = shlex.split(part)
            if "pip" in " ".join(tokens[:1]) and tokens[1:2] == ["install"]:
                out.append(tokens[2:])
    return out


def test_dockerfile_is_multi_stage_and_the_runtime_copies_the_built_environment():
    stages = _stages()
    assert len(stages) >= 2, f"one stage only: {[s for s, _ in stages]}"
    (build, build_steps), (_, final) = stages[0], stages[-1]
    assert _pip_installs(build_steps), "the first stage installs nothing"
    assert not _pip_installs(final), "the runtime stage installs packages itself (build tools would end up in it)"
    copies = [args for word, args in final if word == "COPY"]
    assert any(f"--from={build}" in c for c in copies), f"the runtime stage copies nothing from {build!r}: {copies}"


def test_installs_with_the_constraints_and_the_extras_the_readme_names():
    extras_declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "pip install -c constraints.txt" in readme  # the README's way, which the image follows
    extras_page = (REPO / "docs" / "extras.md").read_text(encoding="utf-8")
    installs = [args for _, steps in _stages() for args in _pip_installs(steps)]
    ours = [a for a in installs if any(re.fullmatch(r"\.(\[[\w,]+\])?", t) for t in a)]
    assert len(ours) == 1, f"expected one install of the checkout (.[extras]): {installs}"
    args = ours[0]
    assert "-c" in args and args[args.index("-c") + 1] == "constraints.txt", f"not installed with -c constraints.txt: {args}"
    spec = next(t for t in args if t.startswith(".["))
    extras = spec[2:-1].split(",")
    assert {"serve", "offline"} <= set(extras), f"the server needs [serve], the offline evidence [offline]: {spec}"
    for extra in extras:
        assert extra in extras_declared, f"{extra!r} is not an extra of pyproject.toml"
        assert f"`[{extra}]`" in extras_page, f"the manual's extras table (docs/extras.md) does not name [{extra}]"
    assert "nudenet" not in extras, "NudeNet is AGPL-3.0: never in the image by default"
    # the files the build copies are in the checkout and not left out of the build context
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    for word, args in _stages()[0][1]:
        if word == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the checkout"
                assert source.rstrip("/") not in ignored, f"COPY {source}: .dockerignore leaves it out"


def test_runs_as_an_unprivileged_user():
    final = _stages()[-1][1]
    users = [args for word, args in final if word == "USER"]
    assert users, "the runtime stage has no USER: it runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]}"
    assert any(word == "RUN" and re.search(rf"useradd\b.*\b{re.escape(user)}\b", args) for word, args in final) or user.isdigit()


def test_health_check_asks_readyz_and_the_server_listens_beyond_loopback():
    final = _stages()[-1][1]
    checks = [args for word, args in final if word == "HEALTHCHECK"]
    assert len(checks) == 1 and "CMD" in checks[0], checks
    assert re.search(r"http://(127\.0\.0\.1|localhost):8000/readyz", checks[0]), checks[0]
    entry = " ".join(args for word, args in final if word in ("ENTRYPOINT", "CMD"))
    assert '"serve"' in entry and '"0.0.0.0"' in entry and '"8000"' in entry, entry
    assert any(word == "EXPOSE" and "8000" in args for word, args in final)


def test_compose_wires_the_app_to_postgres_and_prometheus_to_the_app():
    compose = _compose()
    services = compose["services"]
    assert {"icm", "postgres", "prometheus"} <= set(services)
    app, db, prom = services["icm"], services["postgres"], services["prometheus"]
    assert app["build"] == "." or app["build"].get("context") == "."
    command = app["command"]
    url = command[command.index("--db") + 1]
    m = re.fullmatch(r"postgresql\+psycopg://(\w+)@([\w.-]+):(\d+)/(\w+)", url)
    assert m, f"--db {url} is not a PostgreSQL URL without a password"
    user, host, port, name = m.groups()
    assert host == "postgres" and port == "5432"
    assert (db["environment"]["POSTGRES_USER"], db["environment"]["POSTGRES_DB"]) == (user, name)
    # one password, from .env, for both; never written in the file
    assert app["environment"]["PGPASSWORD"].startswith("${ICM_POSTGRES_PASSWORD:?")
    assert db["environment"]["POSTGRES_PASSWORD"].startswith("${ICM_POSTGRES_PASSWORD:?")
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy" and "healthcheck" in db
    # 0.0.0.0 needs keys: the app refuses to start without them
    assert command[command.index("--host") + 1] == "0.0.0.0" and app["environment"]["ICM_API_KEYS"].startswith("${ICM_API_KEYS:?")
    listen = command[command.index("--port") + 1]

    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"] if v.startswith("./")}
    config_path = REPO / mounts["/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    jobs = [j for j in scrape["scrape_configs"] if j.get("metrics_path", "/metrics") == "/metrics"]
    targets = [t for j in jobs for c in j["static_configs"] for t in c["targets"]]
    assert f"icm:{listen}" in targets, f"Prometheus scrapes {targets}, not the icm service on port {listen}"
    job = next(j for j in jobs if f"icm:{listen}" in [t for c in j["static_configs"] for t in c["targets"]])
    # /metrics answers only an admin key (docs/security.md): Prometheus sends one, read from a compose secret
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer"
    secret = auth["credentials_file"].removeprefix("/run/secrets/")
    assert secret in prom["secrets"] and secret in compose["secrets"]
    assert "credentials" not in auth, "a key written into prometheus.yml"


def test_secrets_stay_out_of_git_and_the_image():
    compose = _compose()
    gitignore = (REPO / ".gitignore").read_text().splitlines()
    dockerignore = (REPO / ".dockerignore").read_text().splitlines()
    for secret in compose["secrets"].values():
        folder = str(Path(secret["file"]).parent).removeprefix("./").removeprefix(".")
        assert f"/{folder}/" in gitignore and folder in dockerignore, folder
    assert "/.env" in gitignore and ".env" in dockerignore


def test_ci_builds_the_image_only_where_docker_works():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    step = ci[re.search(r"^# -+ 6\. container$", ci, re.M).start():]
    guard = re.search(r"^\s*if .*docker info\b.*; then$", step, re.M)
    build = re.search(r"^\s*docker build\b", step, re.M)
    assert guard and build and guard.start() < build.start(), "docker build runs without the docker info guard"
    assert re.search(r"^STEPS=.*\bcontainer\b", ci, re.M), "the container step is not among the default steps"
