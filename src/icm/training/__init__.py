"""Instruction tuning (``icm train``).

One concept per module; nothing here imports torch until a run starts:

* :mod:`~icm.training.config`: :class:`TrainConfig`, one YAML file whose every field is a flag;
* :mod:`~icm.training.datasets`: the exports of ``icm data export`` as examples, the
  moderation questions worded and rendered as ``icm moderate`` asks them, MSFT mixing;
* :mod:`~icm.training.collator`: the model's chat template, loss on assistant tokens only;
* :mod:`~icm.training.trainer`: transformers' Trainer with PEFT (LoRA or full, MSFT or CSFT);
* :mod:`~icm.training.evaluate`: the held-out ICM evaluation at the end of a run;
* :mod:`~icm.training.merge`: ``icm train merge``;
* :mod:`~icm.training.launch` and ``accelerate_configs/``: many devices with ``accelerate launch``;
* :mod:`~icm.training.tiny`: tiny VLMs with a tokenizer trained locally.

The synthetic task, its scripted teacher and ``icm demo e2e`` are in :mod:`icm.demo`.
"""

from icm.training.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config"]
