"""A model that says "Yes" to every question, as the engine records it (issue 19).

Its term answer is a parsed "Yes" (P(Yes) = 1, no logprobs); "Yes" is not one of the
lettered options of an attribute question, so every attribute answer is off-format. The
engine then decides on the term alone: every image is blocked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from icm.moderation.backends.base import Backend, NotJudged, YesNoScore
from icm.moderation.engine import Moderator
from icm.moderation.record import ModerationRecord

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
SAMPLE_PHOTOS = ("china.jpg", "flower.jpg", "grace_hopper.jpg")  # safe photographs: none violates


class SaysYes(Backend):
    name = "says-yes"
    capabilities = frozenset({"score_yes_no", "choose"})

    def ask(self, images, queries):
        return [
            {q.key: YesNoScore(p_yes=1.0, source="parsed", raw={"text": "Yes"}) if q.kind == "yes_no"
             else NotJudged("off-format", "answered 'Yes'", {"text": "Yes"}) for q in queries}
            for _ in images
        ]


def says_yes_records(folder: Path, policy: str = "icm-sexy") -> list[ModerationRecord]:
    """The sample photos copied to ``folder`` and moderated by :class:`SaysYes`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SAMPLE_PHOTOS:
        shutil.copy(EXAMPLES / name, folder / name)
        paths.append(str(folder / name))
    return Moderator(SaysYes(), policy=policy).moderate_paths(paths)
