"""Folder and glob walks (issue 20, item 5): iterative, each folder once by (device, inode),
and every folder or pattern yields records or an error entry naming the folder."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.images import iter_image_paths

runner = CliRunner()


def _remove_deep(root: Path, part: str = "d") -> None:
    """Delete a chain ``root/part/part/...`` bottom up through directory descriptors, without
    recursion (pytest's own cleanup, shutil.rmtree, recurses and would fail on it later)."""
    fd = os.open(root, os.O_RDONLY)
    depth = 0
    while os.path.isdir(os.path.join(f"/proc/self/fd/{fd}", part)):
        sub = os.open(part, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, depth = sub, depth + 1
    for _ in range(depth):
        for name in os.listdir(fd):
            os.unlink(name, dir_fd=fd)
        up = os.open("..", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        os.rmdir(part, dir_fd=up)
        fd = up
    os.close(fd)


@pytest.fixture()
def deep(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Makes deep folders under tmp_path (see _deep) and flattens them afterwards."""
    made: list[tuple[Path, str]] = []

    def make(name: str, levels: int, part: str = "d") -> Path:
        made.append((tmp_path / name, part))
        return _deep(tmp_path / name, levels, part)

    yield make
    for root, part in made:
        _remove_deep(root, part)


def _deep(root: Path, levels: int, part: str = "d") -> Path:
    """``root/d/d/.../d`` (``levels`` deep) with an image at the top and at the bottom; made
    one folder at a time relative to its parent (os.makedirs recurses, and a path over
    PATH_MAX cannot be named whole)."""
    root.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "top.png")
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir(part, dir_fd=fd)
            sub = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = sub
        with os.fdopen(os.open("bottom.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            Image.new("RGB", (8, 8), (30, 20, 10)).save(fh, format="PNG")
    finally:
        os.close(fd)
    return Path(os.path.join(root, *[part] * levels, "bottom.png"))


def test_a_folder_1000_levels_deep_gives_its_records(tmp_path: Path, deep) -> None:
    bottom = deep("deep", 1000)
    entries = list(iter_image_paths([tmp_path / "deep"]))
    assert [e.path for e in entries] == [tmp_path / "deep" / "top.png", bottom] and all(e.ok for e in entries)
    globbed = list(iter_image_paths([str(tmp_path / "deep" / "**" / "*.png")]))
    assert sorted(e.path for e in globbed if e.path) == sorted([tmp_path / "deep" / "top.png", bottom])


def test_a_glob_over_self_symlinks_ends(tmp_path: Path) -> None:
    (tmp_path / "loop" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "loop" / "sub" / "p.png")
    for name in "abc":
        os.symlink(".", tmp_path / "loop" / name)
    code = (
        "import sys; from icm.moderation.inputs import iter_image_paths\n"
        "print([str(e.path) for e in iter_image_paths([sys.argv[1]])])"
    )
    pattern = str(tmp_path / "loop" / "**" / "*.png")
    code = code.replace("icm.moderation.inputs", "icm.moderation.images")  # the same name on old and new code
    done = subprocess.run([sys.executable, "-c", code, pattern], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([str(tmp_path / "loop" / "sub" / "p.png")])


def test_icm_moderate_on_a_deep_folder_writes_every_record(tmp_path: Path, deep) -> None:
    deep("deep", 1000)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["moderate", str(tmp_path / "deep"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all('"error":null' in line for line in lines)
