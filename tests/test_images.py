"""Tests of icm.moderation.images on a bad-input corpus generated here (nothing downloaded)."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from icm.moderation.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    LoadedImage,
    PathEntry,
    iter_image_paths,
    load_image,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --------------------------------------------------------------------------- helpers


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def noise(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def gray_png(width: int, height: int, idat: bytes) -> bytes:
    """A hand-made 8-bit grayscale PNG whose header claims ``width`` x ``height``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def expect_error(path: Path, *words: str, **kwargs: object) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert path.name in str(err), f"error does not name the file: {err}"
    for word in words:
        assert word in str(err).lower(), f"{word!r} not in {err}"
    return err


# --------------------------------------------------------------------------- good inputs


def test_plain_jpeg_metadata(tmp_path: Path) -> None:
    data = encode(noise(), "JPEG")
    path = write(tmp_path, "a.jpg", data)
    li = load_image(path)
    assert isinstance(li, LoadedImage)
    assert li.image.mode == "RGB" and li.image.size == (64, 48)
    assert (li.width, li.height) == (64, 48)
    assert li.sha256 == hashlib.sha256(data).hexdigest()
    assert li.n_bytes == len(data)
    assert (li.mode, li.format, li.frames) == ("RGB", "JPEG", 1)
    assert li.source == str(path)


def test_bytes_input_is_labelled_by_name() -> None:
    li = load_image(encode(noise(), "PNG"), name="upload-17")
    assert li.source == "upload-17" and li.format == "PNG"
    with pytest.raises(ImageLoadError, match="upload-18"):
        load_image(b"", name="upload-18")


@pytest.mark.parametrize("name", ["grace_hopper.jpg", "china.jpg", "flower.jpg"])
def test_sample_photos_load(name: str) -> None:
    li = load_image(EXAMPLES / name)
    assert li.image.mode == "RGB" and li.width > 100 and li.height > 100
    assert np.asarray(li.image).std() > 10  # real content, not a blank decode


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1)), "L")
    li = load_image(write(tmp_path, "g.png", encode(gray, "PNG")))
    arr = np.asarray(li.image)
    assert li.mode == "L" and arr.shape == (8, 64, 3)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    assert np.array_equal(arr[..., 0], np.asarray(gray))


def test_bilevel_image(tmp_path: Path) -> None:
    im = Image.new("1", (8, 8), 0)
    im.putpixel((0, 0), 1)
    li = load_image(write(tmp_path, "b.png", encode(im, "PNG")))
    assert li.image.getpixel((0, 0)) == WHITE and li.image.getpixel((1, 1)) == (0, 0, 0)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    li = load_image(write(tmp_path, "cmyk.jpg", encode(im, "JPEG", quality=95)))
    assert li.mode == "CMYK" and li.image.mode == "RGB"
    assert close(li.image.getpixel((8, 8)), RED, tol=20)
    assert any("cmyk" in n.lower() for n in li.notes)


def test_palette_with_transparent_index(tmp_path: Path) -> None:
    im = Image.new("P", (4, 2), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # index 0 black, 1 red
    im.putpixel((0, 0), 0)  # transparent black
    li = load_image(write(tmp_path, "p.png", encode(im, "PNG", transparency=0)))
    assert li.mode == "P"
    assert li.image.getpixel((0, 0)) == WHITE  # not black: composited over white
    assert li.image.getpixel((1, 0)) == RED
    assert any("transparency" in n for n in li.notes)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    li = load_image(write(tmp_path, "g16.png", encode(im, "PNG")))
    assert li.mode == "I;16"
    assert [li.image.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def test_thirty_two_bit_integer_image(tmp_path: Path) -> None:
    im = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32), "I")
    li = load_image(write(tmp_path, "i32.tif", encode(im, "TIFF")))
    assert li.mode == "I"
    assert [li.image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32), "I")
    li = load_image(write(tmp_path, "wide.tif", encode(wide, "TIFF")))
    assert [li.image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    assert any("stretched" in n for n in li.notes)


def test_la_alpha_over_white(tmp_path: Path) -> None:
    im = Image.new("LA", (2, 1), (0, 0))
    im.putpixel((1, 0), (100, 255))
    li = load_image(write(tmp_path, "la.png", encode(im, "PNG")))
    assert li.mode == "LA"
    assert li.image.getpixel((0, 0)) == WHITE
    assert li.image.getpixel((1, 0)) == (100, 100, 100)


def test_rgba_alpha_over_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (3, 1), (255, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 255, 128))
    li = load_image(write(tmp_path, "rgba.png", encode(im, "PNG")))
    assert li.image.getpixel((0, 0)) == WHITE
    assert li.image.getpixel((1, 0)) == RED
    assert close(li.image.getpixel((2, 0)), (127, 127, 255), tol=2)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_every_frame_is_a_view(tmp_path: Path, fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    kwargs: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0}
    if fmt == "WEBP":
        kwargs["lossless"] = True
    li = load_image(write(tmp_path, f"anim.{fmt.lower()}", encode(frames[0], fmt, **kwargs)))
    assert li.frames == 3
    assert close(li.image.getpixel((8, 8)), RED, tol=8)  # ``image`` stays the first frame
    assert [v.frame for v in li.views] == [0, 1, 2] and li.frames_seen == 3
    for view, colour in zip(li.views, (RED, GREEN, BLUE), strict=True):
        assert close(view.image.getpixel((8, 8)), colour, tol=8) and view.background is None
    assert any("all 3 judged" in n for n in li.notes)


def _red_top_blue_bottom(orientation: int) -> bytes:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # stored as 40 wide, 20 high
    arr[:10] = RED
    arr[10:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr, "RGB"), "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(("orientation", "red_side"), [(8, "left"), (6, "right"), (1, "top")])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, red_side: str) -> None:
    li = load_image(write(tmp_path, f"o{orientation}.jpg", _red_top_blue_bottom(orientation)))
    im = li.image
    if red_side == "top":
        assert im.size == (40, 20)
        assert close(im.getpixel((20, 2)), RED, 40) and close(im.getpixel((20, 17)), BLUE, 40)
        assert not any("EXIF" in n for n in li.notes)
        return
    assert im.size == (20, 40)  # rotated a quarter turn
    assert (li.width, li.height) == (20, 40)
    left, right = im.getpixel((2, 20)), im.getpixel((17, 20))
    if red_side == "left":
        assert close(left, RED, 40) and close(right, BLUE, 40)
    else:
        assert close(left, BLUE, 40) and close(right, RED, 40)
    assert any(f"orientation {orientation}" in n for n in li.notes)


# --------------------------------------------------------------------------- bad inputs


def test_empty_file(tmp_path: Path) -> None:
    expect_error(write(tmp_path, "empty.jpg", b""), "empty")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_truncated_file_is_an_error(tmp_path: Path, fmt: str) -> None:
    data = encode(noise(200, 150), fmt)
    path = write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) // 2])
    expect_error(path, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_named_jpg(tmp_path: Path) -> None:
    err = expect_error(write(tmp_path, "notes.jpg", b"hello, this is not a picture\n"), "not an image", "text")
    assert "hello" in err.cause


def test_random_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    expect_error(write(tmp_path, "noise.png", data), "not an image", "unrecognised")


def test_pdf_named_png(tmp_path: Path) -> None:
    expect_error(write(tmp_path, "doc.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj"), "pdf")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    expect_error(tmp_path / "nothere.jpg", "no such file")
    sub = tmp_path / "folder.jpg"
    sub.mkdir()
    expect_error(sub, "directory")


def test_file_over_byte_limit(tmp_path: Path) -> None:
    expect_error(write(tmp_path, "big.png", encode(noise(), "PNG")), "limit", max_bytes=100)


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: Image.Image) -> None:
        raise AssertionError("the loader decoded pixels of an image it should have refused")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    monkeypatch.setattr(Image.Image, "load", boom)


def test_real_decompression_bomb_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    side = 4000  # 16 megapixels of zeros: 16 MB decoded, about 16 KB on disk
    idat = zlib.compress(b"\x00" * ((side + 1) * side), 9)
    path = write(tmp_path, "bomb.png", gray_png(side, side, idat))
    assert path.stat().st_size < 100_000
    # The same file decodes under a large enough limit, so the limit is what refuses it.
    assert load_image(path, max_pixels=20_000_000).image.size == (side, side)
    _forbid_decoding(monkeypatch)
    err = expect_error(path, "decompression bomb", "4000x4000", max_pixels=1_000_000)
    assert "16.0 megapixels" in err.cause


def test_header_only_bomb_over_default_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_decoding(monkeypatch)
    # 12000 x 9000 = 108 MP: over our default, under Pillow's own hard limit.
    assert 12000 * 9000 > DEFAULT_MAX_PIXELS
    expect_error(write(tmp_path, "wide.png", gray_png(12000, 9000, zlib.compress(b""))), "decompression bomb")
    # 60000 x 60000: Pillow itself refuses at open; still our error, naming the file.
    expect_error(write(tmp_path, "huge.png", gray_png(60000, 60000, zlib.compress(b""))), "decompression bomb")


# --------------------------------------------------------------------------- iter_image_paths


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "batch"
    (root / "b_sub" / "deeper").mkdir(parents=True)
    (root / "a_sub").mkdir()
    (root / ".hidden").mkdir()
    (root / "empty").mkdir()
    for rel in ["z.jpg", "A.PNG", "b_sub/2.webp", "b_sub/deeper/1.gif", "a_sub/x.jpeg", ".hidden/h.jpg", ".dot.jpg"]:
        (root / rel).write_bytes(b"x")
    (root / "readme.txt").write_text("not an image")
    return root


def _paths(entries: list[PathEntry], root: Path) -> list[str]:
    return [e.path.relative_to(root).as_posix() for e in entries if e.ok and e.path is not None]


def test_folder_is_walked_recursively_sorted(tree: Path) -> None:
    entries = list(iter_image_paths([tree]))
    assert all(e.ok for e in entries)
    assert _paths(entries, tree) == ["A.PNG", "z.jpg", "a_sub/x.jpeg", "b_sub/2.webp", "b_sub/deeper/1.gif"]
    assert entries == list(iter_image_paths([str(tree)]))  # deterministic, str or Path


def test_missing_inputs_are_error_entries_and_the_batch_goes_on(tree: Path) -> None:
    entries = list(iter_image_paths([tree / "nope.jpg", tree / "z.jpg", tree / "empty", str(tree / "*.bmp")]))
    assert [e.ok for e in entries] == [False, True, False, False]
    assert "no such file" in (entries[0].error or "") and "nope.jpg" in (entries[0].error or "")
    assert "no image files" in (entries[2].error or "")
    assert "no files match" in (entries[3].error or "")
    assert entries[1].path == tree / "z.jpg"


def test_explicit_file_is_kept_whatever_its_extension(tree: Path) -> None:
    entries = list(iter_image_paths([tree / "readme.txt"]))
    assert len(entries) == 1 and entries[0].ok and entries[0].path == tree / "readme.txt"


def test_glob_patterns(tree: Path) -> None:
    entries = list(iter_image_paths([str(tree / "**" / "*.*")]))
    assert _paths(entries, tree) == ["A.PNG", "a_sub/x.jpeg", "b_sub/2.webp", "b_sub/deeper/1.gif", "z.jpg"]
    only_text = list(iter_image_paths([str(tree / "*.txt")]))
    assert len(only_text) == 1 and not only_text[0].ok and "no image files" in (only_text[0].error or "")


def test_stdin_list_and_duplicates(tree: Path) -> None:
    stdin = io.StringIO(f"{tree / 'z.jpg'}\n\n{tree / 'missing.png'}\n{tree / 'a_sub'}\n")
    entries = list(iter_image_paths(["-", tree / "z.jpg"], stdin=stdin))
    assert [(e.ok, e.source) for e in entries] == [
        (True, str(tree / "z.jpg")),
        (False, str(tree / "missing.png")),
        (True, str(tree / "a_sub")),
    ]  # z.jpg given twice, yielded once
    assert entries[2].path == tree / "a_sub" / "x.jpeg"


def test_paths_feed_the_loader(tree: Path, tmp_path: Path) -> None:
    (tree / "z.jpg").write_bytes(encode(noise(), "JPEG"))
    results: list[LoadedImage | ImageLoadError] = []
    for entry in iter_image_paths([tree / "z.jpg", tree / "A.PNG"]):
        assert entry.path is not None
        try:
            results.append(load_image(entry.path))
        except ImageLoadError as err:
            results.append(err)
    assert isinstance(results[0], LoadedImage)
    assert isinstance(results[1], ImageLoadError) and "A.PNG" in str(results[1])


def test_foreign_truncated_images_switch_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise(200, 150), "JPEG")
    path = write(tmp_path, "cut.jpg", data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might
    li = load_image(path)
    assert any("LOAD_TRUNCATED_IMAGES" in n for n in li.notes)
