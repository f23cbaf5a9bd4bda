"""How long the evaluation's intervals take: the stratified bootstrap (AUC, AP, F1, balanced
accuracy) and `icm eval calibrate`, on the paper's ICM-Test results (10,976 images).

    python bench/eval_intervals.py [--seed-dir ../shared/seed] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from icm.evaluation.calibrate import calibrate
from icm.evaluation.icm_metrics import evaluate_icm
from icm.evaluation.labels import LabelResolver
from icm.evaluation.results import read_results
from icm.evaluation.stats import bootstrap_curve_metrics
from icm.policy import load_policy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed-dir", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "seed")
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    results = args.seed_dir / "eval" / "icm_test" / "llava-v1.5-7b-after-baseline.json"
    policy = load_policy("icm-sexy")
    rs = read_results(results, term=policy.term.id)
    resolver = LabelResolver(policy)
    t = time.perf_counter()
    rep = evaluate_icm(rs, resolver, bootstrap=0)
    base = time.perf_counter() - t
    y = np.array([resolver.truth(it.id).positive for it in rs.items])
    s = np.array([it.p_term for it in rs.items])
    t = time.perf_counter()
    iv = bootstrap_curve_metrics(y, s, threshold=0.5, resamples=args.resamples)
    boot = time.perf_counter() - t
    t = time.perf_counter()
    cal = calibrate(rs, resolver, block_precision=0.95, allow_miss=0.01)
    cal_s = time.perf_counter() - t
    auc = iv["roc_auc"]
    print(f"{len(rs.items)} images; evaluate_icm without bootstrap {base:.2f} s")
    print(f"bootstrap, {args.resamples} resamples (AUC, AP, F1, balanced accuracy): {boot:.2f} s; "
          f"AUC {rep.metrics['roc_auc']:.4f} [{auc.low:.4f}, {auc.high:.4f}]")
    print(f"calibrate (block precision >= 0.95, allow miss <= 0.01): {cal_s:.2f} s; "
          f"review {cal.chosen.review:.4g}, block {cal.chosen.block:.4g}" if cal.chosen else f"calibrate: {cal_s:.2f} s, not met")


if __name__ == "__main__":
    main()
