"""Shared pytest setup: the Triton interpreter switch (set before triton is imported),
hypothesis profiles, and the `backend` fixture that runs the op tests on cpu, triton and
cuda. It holds no test logic; op-specific helpers live in tests/ops/helpers.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Without a GPU the Triton kernels run in the interpreter on CPU tensors; the switch is read
# when triton is first imported, so it must be set before anything imports triton.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import sparrow_kernels  # noqa: E402
from sparrow_kernels.ops import backend as sparrow_backend  # noqa: E402

settings.register_profile("default", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@dataclass(frozen=True)
class Backend:
    """One backend under test: its name, the device its tensors live on, and how hard to
    test it (the Triton interpreter is ~1000x slower than compiled kernels)."""

    name: str
    device: torch.device

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device.type == "cpu"

    def examples(self, n: int) -> int:
        """Hypothesis example count: n for compiled backends, fewer for the interpreter."""
        return max(3, n // 5) if self.interpreted else n

    def supports(self, dtype: torch.dtype) -> tuple[bool, str]:
        if self.interpreted and dtype == torch.bfloat16:
            return False, "the Triton interpreter (TRITON_INTERPRET=1) cannot run bf16 dots; bf16 runs on a GPU"
        if self.name == "triton" and dtype == torch.float64:
            return False, "the Triton kernels take fp32/fp16/bf16 only"
        return True, ""

    def skip_unsupported(self, dtype: torch.dtype) -> None:
        ok, why = self.supports(dtype)
        if not ok:
            pytest.skip(why)

    def use(self):
        return sparrow_backend.use_backend(self.name)


def _make_backend(name: str) -> Backend:
    if name == "reference":
        return Backend("reference", torch.device("cpu"))
    if name == "cpu":
        return Backend("cpu", torch.device("cpu"))
    if name == "cuda":
        if not HAS_CUDA:
            pytest.skip("backend 'cuda' needs a CUDA GPU")
        why = sparrow_backend.unavailable_reason("cuda", torch.device("cuda"))
        if why:
            pytest.skip(why)
        return Backend("cuda", torch.device("cuda"))
    if name == "triton":
        if not sparrow_backend.triton_importable():
            pytest.skip("backend 'triton' needs the triton package")
        device = torch.device("cuda" if HAS_CUDA else "cpu")
        why = sparrow_backend.unavailable_reason("triton", device)
        if why:
            pytest.fail(why)  # triton is installed, so an unusable backend is a real failure
        return Backend("triton", device)
    raise ValueError(name)


# On a GPU machine the Triton kernels run on the GPU too, so `pytest -m cuda` selects them.
_BACKEND_PARAMS = {
    "reference": pytest.param("reference"),
    "cpu": pytest.param("cpu"),
    "triton": pytest.param("triton", marks=[pytest.mark.cuda] if HAS_CUDA else []),
    "cuda": pytest.param("cuda", marks=pytest.mark.cuda),
}
# $SPARROW_TEST_BACKENDS (e.g. "reference,cpu") narrows or widens the list; the reference
# checked against itself is only useful while developing the tests.
_TESTED = os.environ.get("SPARROW_TEST_BACKENDS", "cpu,triton,cuda").split(",")


@pytest.fixture(scope="session", params=[_BACKEND_PARAMS[n.strip()] for n in _TESTED if n.strip()])
def backend(request) -> Backend:
    """Each backend that the op tests run on; tests call the op inside `with backend.use():`."""
    return _make_backend(request.param)


@pytest.fixture(scope="session", params=[_BACKEND_PARAMS["reference"]] +
                [_BACKEND_PARAMS[n.strip()] for n in _TESTED if n.strip() and n.strip() != "reference"])
def any_backend(request) -> Backend:
    """The tested backends plus the reference: for behaviour every entry point must share
    (input validation)."""
    return _make_backend(request.param)


@pytest.fixture(scope="session", params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def compiled_backend(request) -> Backend:
    """The C++ backends only (torch.ops.sparrow.* dispatch), e.g. for opcheck."""
    return _make_backend(request.param)


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return (f"sparrow: torch {torch.__version__}, CUDA available {HAS_CUDA}, "
            f"C++ CUDA kernels {sparrow_backend.cuda_kernels_built()}, TRITON_INTERPRET={interp}, "
            f"package at {os.path.dirname(sparrow_kernels.__file__)}")
