"""What judging every frame costs at load time: stills, animations, multi-page TIFF, video.

    .venv/bin/python bench/frames.py [--size 512] [--repeat 3]

Prints, per input, the load time (median of --repeat runs), the views a backend will be
asked about and the frames the file has. Inputs are generated here (nothing downloaded);
the backend cost is not measured (it scales with the number of views).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from icm.moderation.images import load_image
from icm.moderation.video import load_video


def frames(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [Image.fromarray(np.roll(base, 7 * i, axis=1)) for i in range(n)]


def write_video(path: Path, seconds: int, rate: int, size: int) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for im in frames(seconds * rate, size):
            for p in s.encode(av.VideoFrame.from_image(im)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.size
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        frames(1, n)[0].save(d / "still.png")
        still_rgba = frames(1, n)[0].convert("RGBA")
        still_rgba.putalpha(128)
        still_rgba.save(d / "alpha.png")
        for count in (16, 100):
            fr = frames(count, n)
            fr[0].save(d / f"anim{count}.gif", save_all=True, append_images=fr[1:], duration=40)
            fr[0].save(d / f"pages{count}.tiff", save_all=True, append_images=fr[1:])
        cases: list[tuple[str, object]] = [
            ("still.png", lambda p: load_image(p)),
            ("alpha.png (2 backgrounds)", lambda p: load_image(p)),
            ("anim16.gif", lambda p: load_image(p)),
            ("anim100.gif (16 sampled)", lambda p: load_image(p)),
            ("pages16.tiff", lambda p: load_image(p)),
            ("pages100.tiff (16 sampled)", lambda p: load_image(p)),
        ]
        try:
            write_video(d / "clip60s.mp4", 60, 25, n)
            cases.append(("clip60s.mp4 (1 fps, 16 sampled)", lambda p: load_video(p)))
        except ImportError:
            print("PyAV not installed: video skipped (pip install 'icm-assistant[video]')")
        print(f"{'input':36} {'ms':>9} {'views':>6} {'frames':>7}")
        for label, fn in cases:
            path = d / label.split(" ")[0]
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                li = fn(path)  # type: ignore[operator]
                times.append((time.perf_counter() - t0) * 1000)
            print(f"{label:36} {statistics.median(times):9.1f} {len(li.views):6d} {li.frames:7d}")


if __name__ == "__main__":
    main()
