"""Library code leaves process-wide state alone (issue 12): no environment variables set, no
global progress-bar switches. Entry points (icm.cli) may decide such things for their process."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "icm"
# Modules that are process entry points of their own, where setting the process's environment
# is their job: each with the reason.
ENTRY_POINTS = {
    "run/ray.py": "a Ray actor's constructor sets its own worker process's BLAS/OpenMP threads",
    "serve/workers.py": "the multi-worker launcher hands the config to the worker processes it starts",
    "demo/e2e.py": "the demo runner (icm demo e2e / bench/e2e.py) owns its process, as torch.set_num_threads does",
}
SWITCHES = {"disable_progress_bar", "disable_progress_bars", "enable_progress_bar", "enable_progress_bars"}


def _offences(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        # os.environ[...] = ..., os.environ.setdefault/update/pop(...), os.putenv(...)
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and ast.unparse(t.value).endswith("environ"):
                    out.append((node.lineno, ast.unparse(t)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, name = ast.unparse(node.func.value), node.func.attr
            if owner.endswith("environ") and name in {"setdefault", "update", "pop", "clear", "__setitem__"}:
                out.append((node.lineno, ast.unparse(node)))
            if name == "putenv" or name in SWITCHES:
                out.append((node.lineno, ast.unparse(node)))
    return out


def test_library_modules_set_no_environment_variables_or_progress_bar_switches():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "cli" or rel.as_posix() in ENTRY_POINTS:
            continue
        for line, code in _offences(ast.parse(path.read_text(encoding="utf-8"))):
            found.append(f"src/icm/{rel}:{line}: {code}")
    assert not found, "process-wide side effects in library code:\n" + "\n".join(found)


def test_entry_points_named_exist():
    assert all((SRC / p).is_file() for p in ENTRY_POINTS)


def test_the_check_sees_what_it_looks_for():
    sample = ast.parse("import os\nos.environ['HF_HUB_OFFLINE'] = '1'\nos.environ.setdefault('A', 'b')\n"
                       "datasets.disable_progress_bars()\nhf_logging.enable_progress_bar()\n")
    assert [line for line, _ in _offences(sample)] == [2, 3, 4, 5]
