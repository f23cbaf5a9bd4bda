"""Shared test configuration: fixtures (seed data, tiny models), the unexpected-skip check.

Scaffolding that several test files share lives in modules beside this file, imported
by name (this folder is on ``sys.path``):

* ``serve_helpers``: ``ColourBackend`` (a scripted model whose evidence is redness),
  ``png()`` and ``live_server(app)``, the one uvicorn-in-a-thread harness;
* ``fake_openai``: ``FakeOpenAIServer``, a scripted OpenAI-compatible server
  (``fake_openai_server()`` runs it, one per test module behind the ``vlm`` and ``fake``
  fixtures below), and vLLM/Ollama-shaped response bodies;
* ``square_policy``: the red/blue square policy YAML those tests and the tiny LLaVA's moderate with;
* ``openai_recorder``: a server that records the requests an OpenAI client sends;
* ``tiny_models``: tiny local VLMs (behind the ``tiny_*_path`` fixtures below).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fake_openai import FakeOpenAIServer

REPO = Path(__file__).resolve().parents[1]
SEED = Path(os.environ.get("ICM_SEED_DIR", REPO.parent / "shared" / "seed"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
if str(Path(__file__).resolve().parent) not in sys.path:  # the helper modules, whatever pytest's import mode
    sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def seed_dir() -> Path:
    """The paper's published data (../shared/seed); tests that need it skip without it."""
    if not (SEED / "README.md").exists():
        pytest.skip(f"seed data not found at {SEED} (set ICM_SEED_DIR to the paper's published data)")
    return SEED


# --------------------------------------------------------------------------- tiny models
# Tiny multimodal checkpoints saved to a session tmp dir (see tests/tiny_models.py) and
# loaded by path, as a user loads a real one. They need torch + transformers; tests that
# use them skip without the [hf] extra.


def _hf_stack() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import torch

    # One thread: the tiny models' ops are too small to gain from more, and with another
    # process busy on this 2-core machine, 2 threads made LoRA training 10x slower.
    # ICM_TEST_THREADS (and ICM_TEST_DETERMINISTIC, see pytest_configure) are for checking
    # that the trained-outcome tests hold under other kernels (issue 25).
    torch.set_num_threads(test_threads())


def test_threads() -> int:
    """torch threads of the tests that train or score (``ICM_TEST_THREADS``, default 1)."""
    return int(os.environ.get("ICM_TEST_THREADS", "1"))


test_threads.__test__ = False  # a helper, not a test


def pytest_configure(config: pytest.Config) -> None:
    """``ICM_TEST_DETERMINISTIC=1``: torch's deterministic algorithms for the whole run."""
    if os.environ.get("ICM_TEST_DETERMINISTIC", "").strip().lower() in ("1", "true", "yes"):
        import torch

        torch.use_deterministic_algorithms(True)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_llava_path(tiny_models_dir: Path) -> Path:
    """A ~0.2M-parameter LLaVA (32 px CLIP, 2-layer Llama) with processor and chat template."""
    _hf_stack()
    from tiny_models import build_tiny_llava

    return build_tiny_llava(tiny_models_dir / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_qwen2vl_path(tiny_models_dir: Path) -> Path:
    """A tiny Qwen2-VL whose processor config names the stock Qwen2VLProcessor."""
    _hf_stack()
    from tiny_models import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tiny_models_dir / "tiny-qwen2vl")


@pytest.fixture(scope="session")
def tiny_idefics3_path(tiny_models_dir: Path) -> Path:
    """A tiny Idefics3 (SmolVLM's architecture) that splits large images into tiles."""
    _hf_stack()
    from tiny_models import build_tiny_idefics3

    return build_tiny_idefics3(tiny_models_dir / "tiny-idefics3")


@pytest.fixture(scope="session")
def color_adapter_path(tiny_llava_path: Path, tiny_models_dir: Path) -> Path:
    """A LoRA adapter on the tiny LLaVA, trained here to answer "Is the image red/blue?".

    Trained to a target loss on held-out squares, not for a fixed number of steps (see
    ``tiny_models.COLOR_P_CORRECT``): a run that reaches the step cap first fails the tests
    that use it, naming the loss reached. Seeded by ``ICM_TEST_SEED`` (default 0).
    """
    _hf_stack()
    pytest.importorskip("peft")
    from tiny_models import AdapterNotTrained, train_color_adapter

    try:
        return train_color_adapter(tiny_llava_path, tiny_models_dir / "color-adapter")
    except AdapterNotTrained as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def vlm() -> Iterator[tuple[FakeOpenAIServer, str]]:
    """tests/fake_openai.py's server on 127.0.0.1 and its base URL, one per test module (fastapi, uvicorn)."""
    from fake_openai import fake_openai_server

    with fake_openai_server() as running:
        yield running


@pytest.fixture()
def fake(vlm: tuple[FakeOpenAIServer, str]) -> FakeOpenAIServer:
    """The module's fake server, its scripts and recorded requests cleared."""
    vlm[0].reset()
    return vlm[0]


# --------------------------------------------------------------------------- unexpected skips
# In CI (CI=true, or ICM_STRICT_SKIPS=1 as .ci/run sets; ICM_STRICT_SKIPS=0 turns it off) a
# test that skips for a reason matched by no pattern of tests/allowed_skips.txt fails the
# run: a missing browser, database or data set must not hide a test behind a green run.

ALLOWED_SKIPS = Path(__file__).resolve().parent / "allowed_skips.txt"
_unexpected_skips: list[tuple[str, str]] = []


def _strict_skips() -> bool:
    flag = os.environ.get("ICM_STRICT_SKIPS")
    if flag is not None:
        return flag.strip().lower() not in ("", "0", "false", "no")
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _allowed_skip_patterns() -> list[re.Pattern[str]]:
    if not ALLOWED_SKIPS.exists():
        return []
    lines = (line.strip() for line in ALLOWED_SKIPS.read_text(encoding="utf-8").splitlines())
    return [re.compile(line) for line in lines if line and not line.startswith("#")]


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not any(p.search(reason) for p in _allowed_skip_patterns()):
        _unexpected_skips.append((report.nodeid, reason))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    if not _unexpected_skips:
        return
    strict = _strict_skips()
    title = "unexpected skips (they fail this run)" if strict else "skips not in tests/allowed_skips.txt"
    terminalreporter.section(title, sep="=", red=strict, yellow=not strict)
    for nodeid, reason in _unexpected_skips:
        terminalreporter.line(f"{nodeid}: {reason}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and _strict_skips() and session.exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
