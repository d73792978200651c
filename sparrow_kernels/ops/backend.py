"""Backend selection for the sparrow ops, in one place.

Names: `reference` (PyTorch spec), `cpu` (C++), `cuda` (C++ CUDA), `triton`, and `auto`
(CPU tensors -> cpu; CUDA tensors -> cuda when the C++ CUDA kernels are built, else
triton). Chosen by `use_backend(...)` > env `SPARROW_BACKEND` > `auto`. This module only
decides; it must not import kernels (the ops front calls them) nor load the extension.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "SPARROW_BACKEND"

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("sparrow_backend", default=None)


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"sparrow backend: unknown name {name!r}; expected one of "
                         f"{', '.join(('auto',) + BACKENDS)}")
    return name


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend`, else $SPARROW_BACKEND, else auto.
    (Inside torch.compile, `use_backend` changes are guarded; $SPARROW_BACKEND is read once
    when the function is traced.)"""
    name = _requested.get()
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        if name != "auto" and name not in BACKENDS:
            raise ValueError(f"sparrow backend: unknown name {name!r} in ${ENV_VAR}; expected one of "
                             f"{', '.join(('auto',) + BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed sparrow ops on backend `name` (or `auto`)."""
    token = _requested.set(_check_name(name.lower()))
    try:
        yield
    finally:
        _requested.reset(token)


# The ops a build with CUDA must serve with C++ CUDA kernels (csrc/cuda/*.cu). The one op
# left out, window_attn_backward, has no C++ CUDA kernel by design: its CUDA kernel is Triton's,
# registered explicitly by ops/__init__.py.
CPP_CUDA_REQUIRED = ("window_attn", "gather_hidden", "tree_verify_greedy", "tree_verify_sample", "kv_compact")
TRITON_CUDA_BY_DESIGN = ("window_attn_backward",)

# The ops whose CUDA kernel came from the C++ build, recorded by ops/__init__.py right after loading
# _C and before Triton fills the gaps (after that the dispatcher alone cannot tell them apart).
_cpp_cuda_ops: frozenset[str] | None = None


def record_cpp_cuda_ops(names) -> None:
    global _cpp_cuda_ops
    _cpp_cuda_ops = frozenset(names)


def _cpp_cuda() -> frozenset[str]:
    if _cpp_cuda_ops is not None:
        return _cpp_cuda_ops
    return frozenset(n for n in CPP_CUDA_REQUIRED
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow::{n}", "CUDA"))


def cuda_kernels_built() -> bool:
    """True when the compiled extension was built with CUDA (it registered C++ CUDA kernels)."""
    return bool(_cpp_cuda())


def missing_cuda_kernels() -> list[str]:
    """The ops of a CUDA build that lack their C++ CUDA kernel (a broken build: an error, not a
    fallback); empty for a complete CUDA build and for a CPU-only build."""
    built = _cpp_cuda()
    return [n for n in CPP_CUDA_REQUIRED if n not in built] if built else []


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on tensors of `device`, or None when it can."""
    kind = device.type
    if kind == "meta":  # shape-only tracing: every backend's fake implementation applies
        return None
    if name == "reference":
        return None
    if name == "cpu":
        return None if kind == "cpu" else f"backend 'cpu' runs on CPU tensors, got {kind} tensors"
    if name == "cuda":
        if kind != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got {kind} tensors"
        if not cuda_kernels_built():
            return ("backend 'cuda' needs the C++ CUDA kernels, but sparrow_kernels._C was built "
                    "without CUDA (rebuild with SPARROW_CUDA=1 pip install -e . --no-build-isolation)")
        missing = missing_cuda_kernels()
        if missing:
            return (f"sparrow_kernels._C was built with CUDA but has no C++ CUDA kernel for {', '.join(missing)} "
                    f"(an incomplete build; rebuild with SPARROW_CUDA=1 pip install -e . --no-build-isolation)")
        return None
    if name == "triton":
        if not triton_importable():
            return "backend 'triton' needs the triton package, which is not installed"
        if kind == "cuda":
            return None
        if kind == "cpu" and triton_interpreter_on():
            return None
        return (f"backend 'triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                f"before triton is imported), got {kind} tensors")
    raise ValueError(f"sparrow backend: unknown name {name!r}")


def resolve(device: torch.device, name: str | None = None) -> str:
    """The concrete backend for tensors on `device`: the requested one (or `name`), with
    `auto` resolved; raises RuntimeError naming the backend when it cannot run there."""
    name = _check_name(name.lower()) if name is not None else requested_backend()
    if name == "auto":
        if device.type == "cuda":
            name = "cuda" if cuda_kernels_built() else "triton"
        elif device.type in ("cpu", "meta"):
            name = "cpu"
        else:
            raise RuntimeError(f"sparrow backend 'auto': no backend for {device.type} tensors "
                               f"(supported: cpu, cuda)")
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"sparrow backend {name!r} is unavailable: {reason}")
    return name


def available_backends(device: torch.device) -> list[str]:
    """The backends that can run on tensors of `device` (for tests and benchmarks)."""
    return [n for n in BACKENDS if unavailable_reason(n, device) is None]
