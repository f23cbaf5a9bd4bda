"""Pixels to 8-bit RGB: transparency over white and black, 16-bit and float modes, CMYK.

Split from :mod:`icm.moderation.images` (the loader); :mod:`icm.moderation.image_frames` uses
:func:`to_rgb_views`, which reduces each view to its share of the pixel budget before keeping it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from icm.moderation.image_base import ALPHA_MIN_FRACTION, BACKGROUNDS, ImageLoadError, _cause, shrink

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})


def to_rgb_views(
    im: Image.Image, source: str, notes: list[str], max_pixels: int | None = None
) -> list[tuple[str | None, Image.Image]]:
    """The frame as 8-bit RGB: over white, and also over black when its alpha is meaningful;
    each view reduced to at most ``max_pixels`` (shared by the two backgrounds) before it is kept."""
    limit = max_pixels or im.width * im.height
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        try:
            rgba = im.convert("RGBA")
        except Exception as exc:  # a mode Pillow cannot convert: this image's error
            raise ImageLoadError(source, f"unsupported colour mode {im.mode!r} ({_cause(exc)})") from exc
        alpha = np.asarray(rgba.getchannel("A"))
        clear = float((alpha < 255).mean()) if alpha.size else 0.0
        del alpha
        if clear > ALPHA_MIN_FRACTION:
            notes.append(
                f"transparency ({im.mode}, {clear:.1%} of pixels not opaque): judged over white and over black, "
                "the worse kept"
            )
            rgba = _shrunk(rgba, max(1, limit // 2), notes)  # Pillow resizes RGBA premultiplied
            return [(name, _composite(rgba, colour)) for name, colour in BACKGROUNDS.items()]
        if clear > 0:
            notes.append(f"transparency ({im.mode}) composited over white ({clear:.2%} of pixels, too few to matter)")
        return [(None, _composite(_shrunk(rgba, limit, notes), BACKGROUNDS["white"]))]
    if im.mode == "RGB" and im.width * im.height > limit:
        return [(None, _shrunk(im, limit, notes))]  # no full-size copy
    return [(None, _shrunk(_to_rgb(im, source, notes), limit, notes))]


def _shrunk(im: Image.Image, max_pixels: int, notes: list[str]) -> Image.Image:
    small = shrink(im, max_pixels)
    if small is not im:
        notes.append(
            f"reduced from {im.width}x{im.height} to {small.width}x{small.height} "
            f"(each view kept at most {max_pixels:,} pixels)"
        )
    return small


def _composite(rgba: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*colour, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _to_rgb(im: Image.Image, source: str, notes: list[str]) -> Image.Image:
    """Any Pillow mode without transparency to 8-bit RGB."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_8bit(np.asarray(im), mode, notes), "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(im, notes)
    try:
        return im.convert("RGB")
    except Exception as exc:  # a mode Pillow cannot convert: this image's error
        raise ImageLoadError(source, f"unsupported colour mode {mode!r} ({_cause(exc)})") from exc


def _high_depth_to_8bit(arr: np.ndarray, mode: str, notes: list[str]) -> np.ndarray:
    """16-bit, 32-bit integer or float pixels to uint8, keeping the visible range.

    Pillow's own ``convert`` clips these to 255, which turns most 16-bit images white.
    """
    values = arr.astype(np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scaled, how = values / 257.0, "16-bit values scaled to 8 bits"
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled, how = values * 255.0, "floating-point values in [0, 1] scaled to 8 bits"
    elif lo >= 0 and hi <= 255:
        scaled, how = values, f"{mode}-mode values already in 0-255, kept"
    elif lo >= 0 and hi <= 65535:
        scaled, how = values / 257.0, f"{mode}-mode values treated as 16-bit and scaled to 8 bits"
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        how = f"{mode}-mode values in [{lo:g}, {hi:g}] stretched to 0-255"
    notes.append(how)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if out is not None:
                notes.append("CMYK converted to sRGB with the embedded ICC profile")
                return out
        except Exception as exc:  # noqa: BLE001 - fall back to the plain conversion
            notes.append(f"embedded ICC profile unusable ({_cause(exc)})")
    notes.append("CMYK converted to RGB without colour management")
    return im.convert("RGB")
