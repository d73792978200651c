"""Which kernel serves each op on CUDA tensors, checked without a GPU: a build with CUDA must
register every op's C++ CUDA kernel (window_attn_backward: Triton's, explicitly), and an op
it lacks is an error when called or selected, never a quiet fall back to Triton."""
from __future__ import annotations

import importlib

import pytest
import torch

from sparrow_kernels import ops
from sparrow_kernels.ops import backend

BUILD = importlib.import_module("sparrow_kernels._build_info")
CUDA = torch.device("cuda")


@pytest.mark.skipif(not BUILD.WITH_CUDA, reason="sparrow_kernels._C was built without CUDA (SPARROW_CUDA=0): "
                                               "the CUDA registrations are checked by the CUDA build (CI)")
def test_a_cuda_build_registers_every_cpp_cuda_kernel():
    for name in backend.CPP_CUDA_REQUIRED:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow::{name}", "CUDA"), name
        assert name in ops.CPP_CUDA_OPS, f"{name}: its CUDA kernel is not the C++ one"
    for name in backend.TRITON_CUDA_BY_DESIGN:   # registered at import, GPU or not
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow::{name}", "CUDA"), name
    assert backend.cuda_kernels_built() and backend.missing_cuda_kernels() == []


def test_build_info_agrees_with_the_registrations():
    assert backend.cuda_kernels_built() == bool(BUILD.WITH_CUDA)


def test_plan_marks_a_missing_cpp_kernel_as_an_error():
    full = set(backend.CPP_CUDA_REQUIRED)
    plan = ops.cuda_kernel_plan(full - {"kv_compact"}, triton_available=True)
    assert plan["kv_compact"] == "missing"
    assert plan["window_attn_backward"] == "triton"
    assert {n for n, what in plan.items() if what == "cpp"} == full - {"kv_compact"}
    assert set(ops.cuda_kernel_plan(full, True).values()) == {"cpp", "triton"}
    assert ops.cuda_kernel_plan(full, triton_available=False)["window_attn_backward"] == "missing"
    # a CPU-only build: Triton serves every op on a GPU
    assert set(ops.cuda_kernel_plan(set(), True).values()) == {"triton"}


def test_a_build_missing_one_kernel_registers_an_error_not_triton(monkeypatch):
    if torch._C._dispatch_has_kernel_for_dispatch_key("sparrow::kv_compact", "CUDA"):
        pytest.skip("kv_compact already has a CUDA kernel here; the simulation needs a CPU-only build")
    partial = frozenset(backend.CPP_CUDA_REQUIRED) - {"kv_compact"}
    monkeypatch.setattr(ops, "CPP_CUDA_OPS", partial)
    lib = torch.library.Library("sparrow", "FRAGMENT")
    try:
        registered = ops._register_triton_cuda_kernels(lib=lib)
        assert registered == (["window_attn_backward"] if backend.triton_importable() else [])
        assert torch._C._dispatch_has_kernel_for_dispatch_key("sparrow::kv_compact", "CUDA")
    finally:
        lib._destroy()
    # what the registered kernel does when called on CUDA tensors
    with pytest.raises(RuntimeError, match="kv_compact: no CUDA kernel: an incomplete build"):
        ops._missing_kernel("kv_compact", "an incomplete build")(torch.zeros(1))


def test_the_cuda_backend_refuses_an_incomplete_build(monkeypatch):
    monkeypatch.setattr(backend, "_cpp_cuda_ops", frozenset(backend.CPP_CUDA_REQUIRED) - {"gather_hidden"})
    assert backend.missing_cuda_kernels() == ["gather_hidden"]
    why = backend.unavailable_reason("cuda", CUDA)
    assert why is not None and "no C++ CUDA kernel for gather_hidden" in why
    with pytest.raises(RuntimeError, match="gather_hidden"):
        backend.resolve(CUDA)           # 'auto' on CUDA tensors: an error, not Triton
    with pytest.raises(RuntimeError, match="gather_hidden"):
        backend.resolve(CUDA, "cuda")
