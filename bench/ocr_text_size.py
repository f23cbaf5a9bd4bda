"""The smallest print the OCR gate finds (issue 23), the int8 detector against the float one.

    .venv/bin/python bench/ocr_text_size.py [--sizes 2.5,3,3.5,4,5]

A word (white, with a dark outline) is drawn over each safe sample photo at three places,
its font size a given percentage of the photo's longest side; a placement counts as found
when the word is read back. Printed: found / tried per size, for the gate's int8 detector
(the default) and for RapidOCR's float detector (``ICM_OCR_INT8=0``), and the rendered
gambling posters' lines read by each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from offline_evidence import posters
from offline_speed import photos

from icm.moderation.evidence.ocr import RapidOCRSource

PLACES = [((0.05, 0.1), "Bet now"), ((0.1, 0.5), "Jackpot"), ((0.05, 0.85), "Casino")]


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        import matplotlib

        return ImageFont.truetype(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def with_word(photo: Image.Image, pct: float, place: tuple[float, float], word: str) -> Image.Image:
    im = photo.copy()
    size = round(pct / 100 * max(im.size))
    ImageDraw.Draw(im).text((place[0] * im.width, place[1] * im.height), word, font=font(size), fill=(255, 255, 255),
                            stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0))
    return im


def read(src: RapidOCRSource, im: Image.Image) -> list[str]:
    return [b.label for b in src.run([im])[0].boxes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2.5,3,3.5,4,5", help="font sizes, percent of the longest side")
    args = ap.parse_args()
    base = [Image.open(p).convert("RGB") for p in photos()]
    for int8 in ("1", "0"):
        os.environ["ICM_OCR_INT8"] = int8
        src = RapidOCRSource(intra_op_num_threads=1)
        src.model()
        print(f"detector {src.det_model}")
        for pct in (float(s) for s in args.sizes.split(",")):
            found = tried = 0
            for photo in base:
                for place, word in PLACES:
                    tried += 1
                    norm = word.lower().replace(" ", "")
                    found += any(norm in g.lower().replace(" ", "") for g in read(src, with_word(photo, pct, place, word)))
            print(f"  font {pct:.1f}% of the longest side: {found}/{tried} found")
        with tempfile.TemporaryDirectory() as tmp:
            print(f"  posters: {[read(src, Image.open(p).convert('RGB')) for p in posters(Path(tmp))]}")


if __name__ == "__main__":
    main()
