"""How much a server batch that names several rule sets saves by asking the model once per policy.

Runs the detector backend (real models, CPU) on the sample photos, each named under the four
rule sets of icm-sexy: once as the server does now (:meth:`Service.moderate`: one model call,
each rule set decides), once as it did before (one Moderator run per rule set).

    .venv/bin/python bench/serve_rule_sets.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from icm.moderation.images import load_image
from icm.serve import ServeConfig, create_app
from icm.serve.service import Job
from icm.serve.store import DecisionMeta

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        svc = create_app(ServeConfig(db=str(Path(tmp) / "d.sqlite"))).state.service
        images = [load_image(p.read_bytes(), name=p.name) for p in sorted(EXAMPLES.glob("*.jpg"))]
        rule_sets = [rs.name for rs in svc.policies["icm-sexy"].rule_sets]
        jobs = [Job(image=im, data=b"", policy="icm-sexy", rules=r, meta=DecisionMeta(), load_ms=0.0)
                for im in images for r in rule_sets]
        svc.moderate(jobs[:1])  # load the models
        t0 = time.perf_counter()
        now = svc.moderate(jobs)
        t_now = time.perf_counter() - t0
        t0 = time.perf_counter()
        before = [svc.moderators[("icm-sexy", r)].moderate_loaded([j.image for j in jobs if j.rules == r]) for r in rule_sets]
        t_before = time.perf_counter() - t0
        flat = {(rec.path, rec.rules): rec.verdict for recs in before for rec in recs}
        same = all(flat[(r.path, r.rules)] == r.verdict for r in now)
        print(f"{len(images)} images x {len(rule_sets)} rule sets: once per policy {t_now:.2f} s, "
              f"once per rule set {t_before:.2f} s ({t_before / t_now:.1f}x); same verdicts: {same}")


if __name__ == "__main__":
    main()
