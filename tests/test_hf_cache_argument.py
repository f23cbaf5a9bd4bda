"""The hf backend's shared-prefix cache uses the key/value-cache argument the installed
transformers supports (issue 22 item 7).

transformers releases after 5.18 take the cache as ``cache`` and warn on ``past_key_values``
("deprecated and will be removed in version 5.40.0"); the floor the [hf] extra declares
(5.18, CI's floor step) knows only ``past_key_values``. Under either, scoring with the cache
must not warn about ``past_key_values``, and must give the scores of the plain forward
(a cache passed under a name the model ignores would score the questions without the image).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from icm.moderation.backends.base import Query
from icm.moderation.backends.hf import HFBackend

from tiny_models import noise_image, square_image

TOL = 2e-5
DEPRECATED = ".*past_key_values"  # the start of the message is "`past_key_values` is deprecated ..."
QUERIES = [
    Query("term:sexy", "yes_no", "Is the image sexy?", term="sexy"),
    Query("attr:exposure", "choice", "How much of the body is exposed?",
          ("fully clothed", "swimwear or underwear", "partially nude", "fully nude"), attribute="exposure"),
    Query("term:violent", "yes_no", "Is it violent?", term="violent"),
]


@pytest.fixture()
def transformers_log() -> Iterator[list[logging.LogRecord]]:
    """What transformers logs (its loggers do not propagate; ``warning_once`` forgets what it said)."""
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()  # type: ignore[attr-defined]  # an lru_cache-wrapped function
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


@pytest.mark.parametrize(("model", "size"), [("tiny_llava_path", 32), ("tiny_qwen2vl_path", 56), ("tiny_idefics3_path", 32)])
def test_scoring_with_the_prefix_cache_does_not_use_the_deprecated_argument(
    model: str, size: int, request: pytest.FixtureRequest, transformers_log: list[logging.LogRecord]
) -> None:
    path: Path = request.getfixturevalue(model)
    backend = HFBackend(model=str(path), batch_size=8, device="cpu", min_label_mass=0.0)
    images = [noise_image(size, seed=1), noise_image(size, seed=2), square_image("red", size=size)]
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("error", message=DEPRECATED, category=category)
        cached = backend.ask(images, QUERIES)
    assert backend.prefix_cache, "the shared-prefix path fell back to plain forwards"
    said = [r.getMessage() for r in transformers_log if "past_key_values" in r.getMessage()]
    assert not said, said

    backend.prefix_cache = False
    plain = backend.ask(images, QUERIES)
    for c, p in zip(cached, plain, strict=True):
        assert c["term:sexy"].p_yes == pytest.approx(p["term:sexy"].p_yes, abs=TOL)  # type: ignore[union-attr]
        assert c["term:violent"].p_yes == pytest.approx(p["term:violent"].p_yes, abs=TOL)  # type: ignore[union-attr]
        assert c["attr:exposure"].probs == pytest.approx(p["attr:exposure"].probs, abs=TOL)  # type: ignore[union-attr]
    assert len({round(c["term:sexy"].p_yes, 6) for c in cached}) > 1, "the scores do not depend on the image"  # type: ignore[union-attr]
