"""Packaging: every import is declared where it is needed, and the base install works alone.

The README's first command installs the base package only. An import of a package that
only an extra (or nothing) brings, at the top of a module the base install loads, breaks
every `icm` command there while the dev install, with every extra, stays green: `import
click` did exactly that (typer 0.29 carries its own copy; the dev install had click
through uvicorn). These tests read pyproject.toml, the declared source of truth.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "icm"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
DEV_ONLY_EXTRAS = {"dev", "all"}  # dev: the test tools; all: only a union of the others
# Packages that belong to an extra as a whole: their modules may import that extra's
# packages at module level, since the package is entered through a guarded module
# (icm.serve.app / icm.serve.store raise ImportError naming the extra). The base CLI
# imports only what works without the extra; the runtime test below checks that.
EXTRA_PACKAGES = {"icm.serve": "serve"}

# Declared but never imported by icm, and why they are still needed.
USED_WITHOUT_IMPORT = {
    "python-multipart": "FastAPI parses the upload form with it",
    "accelerate": "transformers' Trainer and `accelerate launch` need it",
    "opencv-python-headless": "NudeNet needs it (its own requirement names the GUI build)",
}


def _requirements(group: str | None) -> list[Requirement]:
    project = PYPROJECT["project"]
    specs = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return [Requirement(s) for s in specs]


def _extras() -> list[str]:
    return [e for e in PYPROJECT["project"]["optional-dependencies"] if e not in DEV_ONLY_EXTRAS]


def _declared(group: str | None) -> set[str]:
    """Distributions a group declares directly (extras that include others count theirs)."""
    names: set[str] = set()
    for req in _requirements(group):
        name = canonicalize_name(req.name)
        if name == "icm-assistant":
            for extra in req.extras:
                names |= _declared(extra)
        else:
            names.add(name)
    return names


def _module_distributions() -> dict[str, set[str]]:
    """Top-level import name -> the installed distributions that provide it."""
    return {mod: {canonicalize_name(d) for d in dists} for mod, dists in metadata.packages_distributions().items()}


def _owning_extra(module: str) -> str | None:
    return next((extra for pkg, extra in EXTRA_PACKAGES.items() if module == pkg or module.startswith(pkg + ".")), None)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class _Imports(ast.NodeVisitor):
    """Third-party imports of one file: (top-level module, line, where), where is
    'module' (runs on import), 'guarded' (module level, inside try/except ImportError) or
    'lazy' (inside a function). `if TYPE_CHECKING:` blocks never run and are left out."""

    def __init__(self) -> None:
        self.found: list[tuple[str, int, str]] = []
        self._function = 0
        self._guarded = 0

    def _add(self, name: str, line: int) -> None:
        top = name.split(".")[0]
        if top != "icm" and top not in sys.stdlib_module_names and top != "__future__":
            self.found.append((top, line, "lazy" if self._function else "guarded" if self._guarded else "module"))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module, node.lineno)

    def _function_body(self, node: ast.AST) -> None:
        self._function += 1
        self.generic_visit(node)
        self._function -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function_body

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        catches = {
            n.id for h in node.handlers for n in ast.walk(h.type) if isinstance(n, ast.Name)
        } if all(h.type is not None for h in node.handlers) else {"Exception"}
        guarded = bool(catches & {"ImportError", "ModuleNotFoundError", "Exception"})
        self._guarded += guarded
        for child in node.body:
            self.visit(child)
        self._guarded -= guarded
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)


def _source_imports() -> list[tuple[str, str, int, str]]:
    """(module, imported top-level name, line, where) for every file of the package."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        out.extend((_module_name(path), top, line, where) for top, line, where in visitor.found)
    return out


def test_every_third_party_import_is_declared_where_it_runs():
    base = _declared(None)
    extras = {e: _declared(e) for e in _extras()}
    anywhere = base.union(*extras.values())
    provides = _module_distributions()
    problems = []
    for module, top, line, where in _source_imports():
        dists = provides.get(top)
        if not dists:
            problems.append(f"{module}:{line}: imports {top!r}, which no installed distribution provides")
            continue
        owner = _owning_extra(module)
        if where == "module" and owner is not None:
            if not dists & (base | extras[owner]):
                problems.append(f"{module}:{line}: imports {top!r} on import, but neither the base nor [{owner}] declares {sorted(dists)}")
        elif where == "module" and not dists & base:
            problems.append(
                f"{module}:{line}: imports {top!r} on import, but {sorted(dists)} is not a base dependency "
                "(declare it, or import it inside the function that needs it with an install hint)"
            )
        elif not dists & anywhere:
            problems.append(f"{module}:{line}: imports {top!r} ({where}), but no extra declares {sorted(dists)}")
    assert not problems, "\n".join(problems)


def test_every_declared_distribution_is_used():
    """A declared package that nothing imports (trl was one) costs every user an install."""
    imported = {top for _, top, _, _ in _source_imports()}
    provides = _module_distributions()
    used = {d for top in imported for d in provides.get(top, ())}
    for group in [None, *_extras()]:
        for name in _declared(group) - used:
            assert name in USED_WITHOUT_IMPORT, f"{group or 'base'} declares {name}, which icm never imports"


def test_module_level_guards_name_the_extra_to_install():
    """A module-level import inside try/except ImportError must say which extra to install."""
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if not isinstance(node, ast.Try):
                continue
            imports = [n for n in node.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            if not imports:
                continue
            text = ast.get_source_segment(path.read_text(encoding="utf-8"), node) or ""
            assert re.search(r"icm-assistant\[\w+\]", text), f"{path.relative_to(REPO)}:{node.lineno}: no install hint"


def _base_closure() -> set[str]:
    """Distributions a base install brings: the base dependencies and theirs, by metadata."""
    env = default_environment()
    env["extra"] = ""
    todo = [Requirement(s) for s in PYPROJECT["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        seen.add(name)
        try:
            todo.extend(Requirement(s) for s in metadata.requires(req.name) or [])
        except metadata.PackageNotFoundError:
            pytest.fail(f"base dependency {req.name} is not installed here")
    return seen


def test_base_install_alone_imports_icm_and_moderates():
    """In a child that can import only what a base install holds: every module imports or
    names the extra to install, `icm moderate examples/images` works, and `icm demo e2e`
    and `icm serve` say what to install instead of a traceback."""
    base = _base_closure()
    blocked = sorted(top for top, dists in _module_distributions().items() if not dists & base and top != "icm")
    assert "torch" in blocked and "click" in blocked and "fastapi" in blocked
    code = textwrap.dedent(
        """
        import importlib, io, json, pkgutil, sys
        from contextlib import redirect_stderr, redirect_stdout

        BLOCKED = set(json.loads(sys.argv[1]))

        class BaseInstallOnly:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {name!r} (not in a base install)", name=name)
                return None

        sys.meta_path.insert(0, BaseInstallOnly())
        import icm

        result = {"modules": {}, "cli": {}}
        for info in pkgutil.walk_packages(icm.__path__, "icm."):
            try:
                importlib.import_module(info.name)
                result["modules"][info.name] = "ok"
            except ImportError as exc:
                result["modules"][info.name] = f"{type(exc).__name__}: {exc}"

        from icm.cli.main import app

        for name, args in {
            "moderate": ["moderate", "examples/images", "--json"],
            "demo": ["demo", "e2e", "--workdir", sys.argv[2]],
            "serve": ["serve", "--port", "0"],
        }.items():
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    returned = app(args, standalone_mode=False)  # an Exit's code is returned
                    code = returned if isinstance(returned, int) else 0
                except SystemExit as exc:
                    code = exc.code
                except Exception as exc:  # reported to the test, which names the command that crashed
                    code = f"{type(exc).__name__}: {exc}"
                code = getattr(code, "exit_code", code)
            result["cli"][name] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
        print(json.dumps(result))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(blocked), str(REPO / "out" / "never-created")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    extras = {e: _declared(e) for e in _extras()}
    provides = _module_distributions()
    for module, outcome in result["modules"].items():
        if outcome == "ok" or "icm-assistant[" in outcome:
            continue
        # inside a package of an extra, a plain "No module named X" is fine for X of that extra
        missing = re.search(r"No module named '([^'.]+)", outcome)
        owner = _owning_extra(module)
        assert owner and missing and provides.get(missing.group(1), set()) & extras[owner], f"{module}: {outcome}"
    assert result["modules"]["icm.cli.main"] == "ok"
    assert result["modules"]["icm.moderation.backends.detector"] == "ok"

    moderate = result["cli"]["moderate"]
    assert moderate["code"] in (0, None), moderate
    records = [json.loads(line) for line in moderate["out"].splitlines() if line.startswith("{")]
    images = sorted(p.name for p in (REPO / "examples" / "images").glob("*.jpg"))
    assert sorted(Path(r["path"]).name for r in records) == images, moderate["out"][-2000:]
    assert all(r["verdict"] in ("allow", "review", "block") for r in records)

    for name, extra in (("demo", "train"), ("serve", "serve")):
        got = result["cli"][name]
        said = got["out"] + got["err"] + str(got["code"])
        assert got["code"] not in (0, None) and f"icm-assistant[{extra}]" in said, got
        assert "Traceback" not in said
    assert not (REPO / "out" / "never-created").exists()


def test_version_has_one_source():
    import icm

    declared = PYPROJECT["project"]["version"]
    assert icm.__version__ == metadata.version("icm-assistant") == declared
    # a source tree that was never installed reads pyproject.toml
    code = (
        "import importlib.metadata as m\n"
        "def missing(name): raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import icm; print(icm.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == declared


def test_transformers_floor_is_the_one_ci_tests():
    """pyproject's transformers floor is what constraints-floor.txt pins for CI's floor run."""
    (req,) = [r for r in _requirements("hf") if r.name == "transformers"]
    floor = next(s.version for s in req.specifier if s.operator == ">=")
    pins = dict(
        line.split("==") for line in (REPO / "constraints-floor.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert Version(pins["transformers"].strip()) == Version(floor)
    assert "constraints-floor.txt" in (REPO / ".ci" / "run").read_text()
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    (setuptools,) = [r for r in build if r.name == "setuptools"]
    assert setuptools.specifier.contains("77") and not setuptools.specifier.contains("76.9")
