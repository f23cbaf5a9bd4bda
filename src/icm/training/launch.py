"""Many devices through ``accelerate launch``, with the configs shipped in this package.

``icm train`` is an ordinary training script for ``accelerate``: launched with
``accelerate launch --config_file CONFIG -m icm.cli.main train config.yaml`` it runs one
process per device and transformers' Trainer handles DDP, DeepSpeed ZeRO-2/3 or FSDP as
the config says. The configs ship in ``icm/training/accelerate_configs/``:

* ``ddp``: DDP on the GPUs of one machine;
* ``deepspeed-zero2`` / ``deepspeed-zero3``: DeepSpeed ZeRO stage 2 / 3 (``pip install deepspeed``);
* ``fsdp``: PyTorch FSDP2;
* ``cpu-ddp``: two processes on a CPU-only machine (gloo), to try a distributed run anywhere.

Override the process count with ``--num_processes N`` after the config file.
"""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path

__all__ = ["accelerate_config_names", "accelerate_config_path", "launch_command"]

_FOLDER = "accelerate_configs"


def accelerate_config_names() -> list[str]:
    folder = resources.files("icm.training").joinpath(_FOLDER)
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def accelerate_config_path(name: str) -> Path:
    """The file of a shipped config (``ddp``, ``deepspeed-zero2`` ...)."""
    key = name[: -len(".yaml")] if name.endswith(".yaml") else name
    names = accelerate_config_names()
    if key not in names:
        raise KeyError(f"no accelerate config {name!r} (shipped: {', '.join(names)})")
    return Path(str(resources.files("icm.training").joinpath(_FOLDER).joinpath(f"{key}.yaml")))


def launch_command(name: str, config: str, *, num_processes: int | None = None, extra: list[str] | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``icm train CONFIG`` with a shipped config."""
    cmd = ["accelerate", "launch", "--config_file", str(accelerate_config_path(name))]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    return [*cmd, "-m", "icm.cli.main", "train", str(config), *(extra or [])]


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
