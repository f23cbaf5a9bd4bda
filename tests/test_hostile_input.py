"""Hostile input to `icm moderate` (issue 11): each gives a per-item error or a clear refusal,
never a hang, a crash or a lost batch.

* FIFOs, devices and sockets are refused before they are opened;
* any exception a decoder raises on a corrupt file becomes the loader's own error (a
  seeded fuzz over every format this Pillow can write);
* file names that are not UTF-8, or hold a newline or trailing spaces, survive JSON
  output, ``--resume`` and stdin (lines or ``-0``);
* resume survives an output torn inside a multi-byte character, and matches by resolved
  path and content hash, not the path's spelling;
* unreadable folders and files are error records.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from icm.cli.main import app
from icm.moderation.images import ImageLoadError, LoadedImage, iter_image_paths, load_image, read_path_list
from icm.moderation.job import ModerateConfig, read_records, run_job
from icm.moderation.record import ModerationRecord
from icm.moderation.video import load_media

runner = CliRunner()


def png(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    Image.new("RGB", (32, 24), colour).save(path, "PNG")
    return path


def finishes(fn: Callable[[], object], seconds: float = 20.0) -> object:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "hung: the call did not return (blocked opening a FIFO?)"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


# --------------------------------------------------------------------------- not regular files


@pytest.fixture()
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    return path


def test_fifo_is_refused_without_opening(fifo: Path) -> None:
    with pytest.raises(ImageLoadError, match="FIFO") as info:
        finishes(lambda: load_image(fifo))
    assert "pipe.jpg" in str(info.value)
    with pytest.raises(ImageLoadError, match="FIFO"):
        finishes(lambda: load_media(fifo))


def test_devices_and_sockets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="character device"):
        finishes(lambda: load_image("/dev/zero"))
    sock_path = tmp_path / "s.png"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(sock_path))
        with pytest.raises(ImageLoadError, match="socket"):
            finishes(lambda: load_image(sock_path))
    finally:
        sock.close()


def test_cli_with_a_fifo_in_the_folder_writes_an_error_record_and_goes_on(tmp_path: Path, fifo: Path) -> None:
    png(tmp_path / "ok.png")
    out = tmp_path / "out.jsonl"
    result = finishes(lambda: runner.invoke(app, ["moderate", str(tmp_path), "--out", str(out)]))
    assert result.exit_code == 1, result.output  # type: ignore[union-attr]
    records = {Path(r.path).name: r for r in read_records(out)[0]}
    assert records["ok.png"].ok
    assert "FIFO" in (records["pipe.jpg"].error or "")
    # resume hashes inputs to match them: it must not open the FIFO either
    result = finishes(lambda: runner.invoke(app, ["moderate", str(tmp_path), "--out", str(out), "--resume"]))
    assert result.exit_code == 1  # type: ignore[union-attr]
    assert len(read_records(out)[0]) == 2


# --------------------------------------------------------------------------- fuzzing the decoders


def _sample(fmt: str) -> bytes | None:
    """A small image in ``fmt`` (three frames where the format has frames), or None."""
    base = Image.new("RGB", (24, 16))
    base.putdata([((x * 10) % 256, (y * 15) % 256, (x * y) % 256) for y in range(16) for x in range(24)])
    for mode in ("RGB", "RGBA", "L", "P", "1"):
        buf = io.BytesIO()
        im = base.convert(mode)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if fmt in ("GIF", "PNG", "WEBP", "TIFF"):
                    im.save(buf, fmt, save_all=True, append_images=[im.rotate(90), im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
                else:
                    im.save(buf, fmt)
        except Exception:  # noqa: BLE001 - this mode or format cannot be written here
            continue
        return buf.getvalue()
    return None


def _mutate(data: bytes, rng: random.Random) -> bytes:
    d = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # bit flips, half of them in the header
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(d)) if rng.random() < 0.5 else rng.randrange(min(len(d), 64))
            d[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        d = d[: rng.randrange(1, len(d))]
    elif kind == 2:  # inserted bytes
        i = rng.randrange(len(d) + 1)
        d[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 3:  # deleted bytes
        i = rng.randrange(len(d))
        del d[i : i + rng.randint(1, 16)]
    else:  # an extreme 32-bit value in the header (sizes, offsets, counts)
        i = rng.randrange(min(len(d), 64))
        d[i : i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"])
    return bytes(d)


Image.init()
SAMPLES = {fmt: data for fmt in sorted(Image.SAVE) if (data := _sample(fmt)) is not None}
"""Every format this Pillow can write (BUFR, GRIB, HDF5 and WMF have save stubs that need plugins)."""
CASES_PER_FORMAT = 60


def test_the_fuzz_covers_the_common_formats() -> None:
    assert {"BLP", "BMP", "DDS", "GIF", "ICO", "JPEG", "MPO", "PNG", "TIFF"} <= set(SAMPLES)


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_fuzzed_files_only_ever_raise_the_loaders_error(fmt: str) -> None:
    data = SAMPLES[fmt]
    rng = random.Random(f"icm-fuzz:{fmt}")
    outcomes = {"loaded": 0, "refused": 0}

    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF/TIFF tags
            for i in range(CASES_PER_FORMAT):
                case = _mutate(data, rng)
                try:
                    li = load_image(case, name=f"{fmt}-case-{i}", max_pixels=1_000_000, max_total_pixels=4_000_000)
                except ImageLoadError as err:
                    assert f"{fmt}-case-{i}" in str(err)
                    outcomes["refused"] += 1
                except BaseException as exc:  # noqa: BLE001 - the point of the test
                    pytest.fail(f"{fmt} case {i}: {type(exc).__name__}: {exc} escaped the loader")
                else:
                    assert isinstance(li, LoadedImage) and li.image.mode == "RGB" and li.views
                    outcomes["loaded"] += 1

    finishes(run, 60)
    assert sum(outcomes.values()) == CASES_PER_FORMAT


def test_a_decoder_exception_of_any_type_is_a_per_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a corrupt AVIF or DDS does (RuntimeError, NotImplementedError ...): one error record, the batch goes on."""
    bad, good = png(tmp_path / "bad.png"), png(tmp_path / "good.png", (0, 0, 200))
    from PIL import PngImagePlugin

    real_load = PngImagePlugin.PngImageFile.load

    def load(self: Image.Image) -> object:
        if getattr(self, "fp", None) is not None and "bad" in str(getattr(self, "_icm_name", "")):
            raise NotImplementedError("unsupported pixel format 0x31545844")
        return real_load(self)

    real_open = Image.open

    def open_(fp: object, *args: object, **kwargs: object) -> Image.Image:
        im = real_open(fp, *args, **kwargs)  # type: ignore[arg-type]
        im._icm_name = current[0]  # type: ignore[attr-defined]
        return im

    current = [""]
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    monkeypatch.setattr(Image, "open", open_)
    results = []
    for path in (bad, good):
        current[0] = path.name
        try:
            results.append(load_image(path))
        except ImageLoadError as err:
            results.append(err)
    assert isinstance(results[0], ImageLoadError) and "NotImplementedError" in str(results[0]) and "bad.png" in str(results[0])
    assert isinstance(results[1], LoadedImage)


# --------------------------------------------------------------------------- file names


def _odd_names(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    names = {
        "latin1": os.fsdecode(b"caf\xe9.png"),  # not UTF-8
        "newline": "two\nlines.png",
        "spaces": "trailing .png  ",
        "lead": " lead.png",
        "unicode": "naïve-ü.png",
    }
    out = {}
    for key, name in names.items():
        colour = (40 * len(out), 100, 200)
        out[key] = png(folder / name, colour)
    return out


def test_odd_file_names_survive_json_output_and_resume(tmp_path: Path) -> None:
    files = _odd_names(tmp_path / "odd")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["moderate", str(tmp_path / "odd"), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == len(files)
    records, bad = read_records(out)
    assert bad == 0 and len(records) == len(files)
    assert sorted(r.local_path() for r in records) == sorted(str(p) for p in files.values())
    latin = next(r for r in records if r.path_bytes)
    assert latin.local_path() == str(files["latin1"]) and "caf\\xe9.png" in latin.path
    assert all(r.path_bytes is None for r in records if r is not latin)
    assert all(r.ok for r in records)
    # resume: everything is already there, nothing is moderated again
    summary = run_job(ModerateConfig(inputs=[str(tmp_path / "odd")], out=str(out), resume=True))
    assert summary.skipped == len(files) and summary.total == len(files)
    assert len(read_records(out)[0]) == len(files)


def test_stdin_lists_keep_names_exactly(tmp_path: Path) -> None:
    files = _odd_names(tmp_path / "odd")
    lines = b"".join(os.fsencode(files[k]) + b"\n" for k in ("latin1", "spaces", "lead", "unicode"))
    entries = list(iter_image_paths(["-"], stdin=io.TextIOWrapper(io.BytesIO(lines + b"\n"))))
    assert [e.path for e in entries] == [files[k] for k in ("latin1", "spaces", "lead", "unicode")]
    assert all(e.ok for e in entries)
    # -0: NUL-separated, so a name with a newline is one name
    nul = b"\0".join(os.fsencode(p) for p in files.values()) + b"\0"
    entries = list(iter_image_paths(["-"], stdin=io.TextIOWrapper(io.BytesIO(nul)), null=True))
    assert [e.path for e in entries] == list(files.values())
    assert list(read_path_list(io.StringIO("a\r\nb c \n\n"))) == ["a", "b c "]


def test_cli_null_input_from_find_print0(tmp_path: Path) -> None:
    files = _odd_names(tmp_path / "odd")
    nul = b"\0".join(os.fsencode(p) for p in files.values()) + b"\0"
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["moderate", "-", "-0", "--out", str(out)], input=nul)
    assert result.exit_code == 0, result.output
    assert sorted(r.local_path() for r in read_records(out)[0]) == sorted(map(str, files.values()))


def test_record_path_is_json_safe_and_reversible() -> None:
    name = os.fsdecode(b"/x/\xff\xfe dir/caf\xe9.jpg")
    r = ModerationRecord(path=name, policy="p", rules="r", backend="b", error=f"cannot load image {name}: permission denied")
    text = r.model_dump_json()
    back = ModerationRecord.model_validate_json(text)
    assert back.local_path() == name and back.path == "/x/\\xff\\xfe dir/caf\\xe9.jpg"
    assert "\\xff" in (back.error or "")


# --------------------------------------------------------------------------- resume


def test_resume_survives_an_output_torn_inside_a_multibyte_character(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = [png(folder / f"{i}-ünïcødé.png", (i * 60, 10, 10)) for i in range(3)]
    out = tmp_path / "out.jsonl"
    first = run_job(ModerateConfig(inputs=[str(folder)], out=str(out)))
    assert first.ok and len(first.records) == 3
    raw = out.read_bytes()
    last = raw.rstrip(b"\n").rfind(b"\n") + 1
    cut = raw.index("ü".encode(), last) + 1  # inside the two bytes of the last record's "ü"
    out.write_bytes(raw[:cut])
    records, bad = read_records(out)
    assert (len(records), bad) == (2, 1)
    second = run_job(ModerateConfig(inputs=[str(folder)], out=str(out), resume=True))
    assert second.skipped == 2 and second.ok
    final, bad = read_records(out)
    assert bad == 0 and sorted(r.path for r in final) == sorted(map(str, paths))


def test_resume_matches_by_resolved_path_and_content_not_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    a = png(folder / "a.png")
    png(folder / "b.png", (0, 90, 0))
    out = tmp_path / "out.jsonl"
    monkeypatch.chdir(tmp_path)
    assert run_job(ModerateConfig(inputs=["imgs/a.png", "imgs/b.png"], out=str(out))).ok
    (tmp_path / "link").symlink_to(folder)
    # the same files spelled otherwise: absolute, through ../ and through a symlink
    spelled = [str(a), "imgs/../imgs/b.png"]
    again = run_job(ModerateConfig(inputs=spelled, out=str(out), resume=True))
    assert again.skipped == 2
    via_link = run_job(ModerateConfig(inputs=["link/a.png"], out=str(out), resume=True))
    assert via_link.skipped == 1
    # same spelling, new content: moderated again
    png(a, (1, 2, 3))
    changed = run_job(ModerateConfig(inputs=["imgs/a.png"], out=str(out), resume=True))
    assert changed.skipped == 0 and len(changed.records) == 1


# --------------------------------------------------------------------------- unreadable files and folders


def test_dangling_symlink_in_a_folder_is_an_error_record(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    png(folder / "ok.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    summary = run_job(ModerateConfig(inputs=[str(folder)]))
    by_name = {Path(r.path).name: r for r in summary.records}
    assert by_name["ok.png"].ok and "no such file" in (by_name["gone.png"].error or "")


def _as_another_user(fn: Callable[[], object]) -> object:
    """Run ``fn`` in a forked child under uid/gid 65534 (nobody) and return its JSON result.

    Root reads mode-000 files and folders, so the permission checks are only real when
    another user runs them. Returns None when this process cannot switch users.
    """
    if os.geteuid() != 0:
        return json.loads(json.dumps(fn()))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, json.dumps(fn()).encode())
        except BaseException:  # noqa: BLE001 - a forked child: nothing may unwind past os._exit
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child running as another user failed"
    return json.loads(data)


@pytest.fixture()
def open_tmp() -> Iterator[Path]:
    """A folder another user can enter (pytest's own tmp folders are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="icm-perm-"))
    os.chmod(path, 0o755)
    yield path
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
    shutil.rmtree(path)


def test_unreadable_folder_and_file_are_error_records(open_tmp: Path) -> None:
    """An unreadable sub-folder and file, checked by a user who really cannot read them."""
    root = open_tmp / "batch"
    (root / "locked").mkdir(parents=True)
    png(root / "locked" / "hidden-inside.png")
    png(root / "ok.png")
    png(root / "secret.png")
    os.chmod(root / "secret.png", 0)
    os.chmod(root / "locked", 0)

    def check() -> list[list[object]]:
        out: list[list[object]] = []
        for e in iter_image_paths([str(root)]):
            if not e.ok:
                out.append(["entry-error", e.error])
                continue
            try:
                load_image(e.path)  # type: ignore[arg-type]
                out.append(["loaded", str(e.path)])
            except ImageLoadError as err:
                out.append(["load-error", str(err)])
        return out

    try:
        got = _as_another_user(check)
    finally:
        os.chmod(root / "locked", 0o755)
        os.chmod(root / "secret.png", 0o644)
    assert ["loaded", str(root / "ok.png")] in got  # type: ignore[operator]
    assert ["load-error", f"cannot load image {root / 'secret.png'}: permission denied"] in got  # type: ignore[operator]
    assert ["entry-error", f"cannot read folder {root / 'locked'}: permission denied"] in got  # type: ignore[operator]
    assert len(got) == 3  # type: ignore[arg-type]


def test_unreadable_input_folder_is_not_reported_as_missing_or_empty(open_tmp: Path) -> None:
    folder = open_tmp / "closed"
    folder.mkdir()
    png(folder / "x.png")
    os.chmod(folder, 0)
    try:
        got = _as_another_user(lambda: [[e.ok, e.error] for e in iter_image_paths([str(folder), str(folder / "x.png")])])
    finally:
        os.chmod(folder, 0o755)
    assert got[0] == [False, f"cannot read folder {folder}: permission denied"]  # type: ignore[index]
    assert got[1] == [False, f"cannot access {folder / 'x.png'}: permission denied"]  # type: ignore[index]
