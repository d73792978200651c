"""Backend selection (sparrow_kernels/ops/backend.py): precedence of use_backend over
$SPARROW_BACKEND over auto, auto's choice per device, and clear errors."""
from __future__ import annotations

import pytest
import torch

import sparrow_kernels
from sparrow_kernels import ops
from sparrow_kernels.ops import backend, reference


@pytest.fixture
def spy_reference(monkeypatch):
    """Records calls that reach the reference's window_attn."""
    calls = []
    real = reference.window_attn

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(reference, "window_attn", spy)
    return calls


def tiny_attn_inputs():
    q = torch.randn(1, 2, 1, 8)
    k = v = torch.randn(1, 1, 3, 8)
    return q, k, v, torch.tensor([3]), torch.tensor([[2]])


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.requested_backend() == "auto"
    assert backend.resolve(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("cuda_built,expected", [(True, "cuda"), (False, "triton")])
def test_auto_on_cuda_prefers_the_cpp_kernels_else_triton(monkeypatch, cuda_built, expected):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "cuda_kernels_built", lambda: cuda_built)
    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    assert backend.resolve(torch.device("cuda")) == expected


def test_auto_on_cuda_without_kernels_or_triton_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "cuda_kernels_built", lambda: False)
    monkeypatch.setattr(backend, "triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="'triton' is unavailable: .*triton package"):
        backend.resolve(torch.device("cuda"))


def test_env_var_selects_the_backend(monkeypatch, spy_reference):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    ops.window_attn(*tiny_attn_inputs())
    assert len(spy_reference) == 1


def test_context_manager_beats_env_var_and_restores(monkeypatch, spy_reference):
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    with sparrow_kernels.use_backend("reference"):
        assert backend.requested_backend() == "reference"
        with sparrow_kernels.use_backend("auto"):
            assert backend.requested_backend() == "auto"
        ops.window_attn(*tiny_attn_inputs())
    assert backend.requested_backend() == "cpu"
    assert len(spy_reference) == 1


def test_default_does_not_call_the_reference(monkeypatch, spy_reference):
    """The hot path never falls back to the reference by accident."""
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    ops.window_attn(*tiny_attn_inputs())
    assert spy_reference == []


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown name 'fast'.*expected one of auto, reference, cpu, cuda, triton"):
        with sparrow_kernels.use_backend("fast"):
            pass
    monkeypatch.setenv(backend.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=r"unknown name 'tpu' in \$SPARROW_BACKEND"):
        ops.window_attn(*tiny_attn_inputs())


def test_a_backend_for_another_device_is_a_clear_error():
    with sparrow_kernels.use_backend("cuda"), \
            pytest.raises(RuntimeError, match="'cuda' is unavailable: .*CUDA tensors"):
        ops.window_attn(*tiny_attn_inputs())


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backend.unavailable_reason("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.unavailable_reason("triton", torch.device("cpu")) is None


def test_available_backends_on_cpu():
    names = backend.available_backends(torch.device("cpu"))
    assert names[:2] == ["reference", "cpu"] and "cuda" not in names


def test_triton_fills_in_the_missing_cuda_kernels():
    """What import does on a GPU machine: every op without a C++ CUDA kernel gets the Triton
    one as its CUDA kernel, and the 'cuda' backend still reports only the C++ build."""
    built_before = backend.cuda_kernels_built()
    # a CUDA build registers some kernels at import (window_attn_backward's Triton one): those stay
    had_before = {name for name in ops.OP_NAMES if torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow::{name}", "CUDA")}
    lib = torch.library.Library("sparrow", "FRAGMENT")
    try:
        registered = ops._register_triton_cuda_kernels(lib=lib, force=True)
        assert set(registered) == set(ops.OP_NAMES) - ops.CPP_CUDA_OPS
        for name in ops.OP_NAMES:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow::{name}", "CUDA"), name
        assert backend.cuda_kernels_built() == built_before == ("window_attn" in ops.CPP_CUDA_OPS)
    finally:
        lib._destroy()
    for name in registered:
        if name not in had_before:   # the test's own registrations are gone with its library
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow::{name}", "CUDA"), name
