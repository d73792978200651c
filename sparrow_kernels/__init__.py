"""Sparrow: text-anchored window attention and lossless tree speculative decoding for
Video LLMs. Importing the package loads the compiled `torch.ops.sparrow.*` ops (with
their fake and autograd registrations) and the backend switch; it must stay light and
never import the model, engine or training code (import those submodules explicitly).
"""
from __future__ import annotations

import importlib

import torch


def _check_build_matches_torch() -> None:
    """A `_C` built against another torch fails with an undefined-symbol error; compare the
    versions written at build time (sparrow_kernels/_build_info.py) first, for a clear message."""
    try:
        info = importlib.import_module("sparrow_kernels._build_info")
    except ImportError:
        return  # not built yet: ops/__init__.py raises the ImportError that says how to build
    built = str(getattr(info, "TORCH_VERSION", "") or "")
    running = torch.__version__
    if built and built.split("+")[0].split(".")[:2] != running.split("+")[0].split(".")[:2]:
        raise ImportError(
            f"sparrow_kernels._C was built for torch {built} but torch {running} is installed; "
            "rebuild it with: pip install -e . --no-build-isolation")


_check_build_matches_torch()

from . import ops  # noqa: E402  (loads _C and registers fake/autograd impls)
from .ops import gather_hidden, kv_compact, tree_verify_greedy, tree_verify_sample, window_attn  # noqa: E402
from .ops.backend import BACKENDS, use_backend  # noqa: E402
from .targets.hf_register import register_when_transformers_loads  # noqa: E402

register_when_transformers_loads()  # attn_implementation="sparrow" once transformers' modeling code loads

__version__ = "0.1.0"

__all__ = ["BACKENDS", "gather_hidden", "kv_compact", "ops", "tree_verify_greedy",
           "tree_verify_sample", "use_backend", "window_attn"]
