"""The whole loop on this CPU, at full size: `icm demo e2e` with its defaults, timed.

    .venv/bin/python bench/e2e.py [--threads 2] [--workdir /tmp/icm-e2e] [--seed 0]

Synthetic figures (1080 train, 270 held-out test, 1000 general text instructions) ->
`icm data generate` against the scripted teacher -> `icm data export -f hf` ->
`icm train` (LoRA on a tiny LLaVA built here, 1500 steps) -> `icm moderate` ->
`icm eval icm` -> rule-set switch general -> teen without retraining. Prints each
stage's time, the attribute-product accuracy, the relabel check and, last,
`ICM accuracy: 0.xxxx`. Exits 1 when the ICM accuracy is below 0.95, the relabel check
fails, or the run takes 10 minutes or more.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/icm-e2e-bench")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (reported)")
    ap.add_argument("--train-images", type=int, default=1080)
    ap.add_argument("--test-images", type=int, default=270)
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0, help="data, tokenizer, model and training seed")
    ap.add_argument("--keep", action="store_true", help="Reuse the workdir instead of starting fresh")
    args = ap.parse_args()

    import torch

    from icm.demo.e2e import E2EConfig, report_lines, run_e2e

    work = Path(args.workdir)
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}", flush=True)
    cfg = E2EConfig(workdir=str(work), threads=args.threads, train_images=args.train_images,
                    test_images=args.test_images, max_steps=args.max_steps, seed=args.seed)
    t0 = time.perf_counter()
    res = run_e2e(cfg, say=lambda line: print(line, flush=True))
    wall = time.perf_counter() - t0
    for line in report_lines(cfg, res)[:-1]:
        print(line)
    print(f"wall time: {wall:.1f}s (limit 600s)")
    print(f"ICM accuracy: {res.icm_accuracy:.4f}")
    ok = res.ok and (res.icm_accuracy or 0) >= 0.95 and wall < 600
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
