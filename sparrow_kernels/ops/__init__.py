"""The ops front: loads the compiled `torch.ops.sparrow.*` ops, adds their fake (meta) and
autograd registrations, and exposes Python functions that dispatch by the selected backend.

Stays thin: no kernels here (they live in csrc/, triton_ops/ and reference.py), only
input validation for the Python-side backends, with the same messages as csrc/checks.h.
"""
from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from . import backend as _backend
from . import reference as _reference
from .checks import check_tensor, format_shape

OP_NAMES = ("window_attn", "window_attn_backward", "gather_hidden", "tree_verify_greedy",
            "tree_verify_sample", "kv_compact")
ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256


def _load_extension() -> None:
    try:
        importlib.import_module("sparrow_kernels._C")
    except ImportError as err:
        raise ImportError(
            "sparrow_kernels._C (the compiled torch.ops.sparrow.* ops) is missing or does not load "
            f"({err}). Build it from the repository root with: pip install -e . --no-build-isolation "
            "(set SPARROW_CUDA=1 to force the CUDA kernels, SPARROW_CUDA=0 for a CPU-only build)."
        ) from err


_load_extension()


# ----------------------------------------------------------------------------- validation
def _check_last_dim_contiguous(op: str, arg: str, t: Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {arg} must be contiguous in its last dimension (stride 1), "
                         f"got strides {list(t.stride())}")


def _values_checkable(t: Tensor) -> bool:
    """Index-range checks read tensor data: done for CPU tensors only (no GPU sync, and
    nothing to read under fake/meta tracing or torch.compile), as in the C++ checks."""
    return t.device.type == "cpu" and not isinstance(t, FakeTensor) and not torch.compiler.is_compiling()


def _check_window_attn(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale, op="window_attn") -> None:
    check_tensor(op, "q", q, [("B", None), ("Hq", None), ("Tq", None), ("D", None)], ATTN_DTYPES)
    B, Hq, Tq, D = q.shape
    dev = q.device
    check_tensor(op, "k", k, [("B", B), ("Hkv", None), ("Tk", None), ("D", D)], ATTN_DTYPES, dev)
    _, Hkv, Tk, _ = k.shape
    check_tensor(op, "v", v, [("B", B), ("Hkv", Hkv), ("Tk", Tk), ("D", D)], ATTN_DTYPES, dev)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k, v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{op}: the query heads Hq={Hq} must be a multiple of the kv heads Hkv={Hkv} (GQA)")
    if D > MAX_HEAD_DIM or D == 0:
        raise ValueError(f"{op}: head dim D must be in [1, {MAX_HEAD_DIM}], got {D}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_last_dim_contiguous(op, name, t)
    check_tensor(op, "kv_len", kv_len, [("B", B)], (torch.int64,), dev)
    check_tensor(op, "q_pos", q_pos, [("B", B), ("Tq", Tq)], (torch.int64,), dev)
    if tree_mask is not None:
        check_tensor(op, "tree_mask", tree_mask, [("B", B), ("Tq", Tq), ("Tq", Tq)], (torch.bool,), dev)
    if n_anchor < 0:
        raise ValueError(f"{op}: n_anchor must be >= 0, got {n_anchor}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite (<= 0 selects 1/sqrt(D)), got {scale}")
    if _values_checkable(kv_len) and B > 0:
        low = Tq if tree_mask is not None else 1
        bad = (kv_len < low) | (kv_len > Tk)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            need = "Tq (tree_mask given)" if tree_mask is not None else "1"
            raise ValueError(f"{op}: kv_len must be in [{need}, Tk] = [{low}, {Tk}], "
                             f"got kv_len[{b}] = {int(kv_len[b])}")


def _check_window_attn_backward(grad_out, q, k, v, out, lse, kv_len, q_pos, window, n_anchor,
                                tree_mask, scale) -> None:
    op = "window_attn_backward"
    _check_window_attn(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale, op=op)
    B, Hq, Tq, D = q.shape
    spec = [("B", B), ("Hq", Hq), ("Tq", Tq), ("D", D)]
    check_tensor(op, "grad_out", grad_out, spec, (q.dtype,), q.device)
    check_tensor(op, "out", out, spec, (q.dtype,), q.device)
    check_tensor(op, "lse", lse, [("B", B), ("Hq", Hq), ("Tq", Tq)], (torch.float32, torch.float64), q.device)


def _check_gather_hidden(hidden, index) -> None:
    op = "gather_hidden"
    if isinstance(hidden, Tensor) or len(hidden) == 0:
        raise ValueError(f"{op}: hidden must be a non-empty list of [B, T, H] tensors, got "
                         f"{'a single tensor' if isinstance(hidden, Tensor) else 'an empty list'}")
    first = hidden[0]
    check_tensor(op, "hidden[0]", first, [("B", None), ("T", None), ("H", None)],
                  (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    B, T, H = first.shape
    for i, h in enumerate(hidden):
        check_tensor(op, f"hidden[{i}]", h, [("B", B), ("T", T), ("H", H)], (first.dtype,), first.device)
        _check_last_dim_contiguous(op, f"hidden[{i}]", h)
    check_tensor(op, "index", index, [("B", B), ("N", None)], (torch.int64,), first.device)
    if _values_checkable(index) and index.numel() > 0:
        bad = (index < -1) | (index >= T)
        if bool(bad.any()):
            b, n = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"{op}: index values must be in [-1, T) = [-1, {T}), "
                             f"got index[{b}, {n}] = {int(index[b, n])}")


def _check_tree_links(op: str, next_token: Tensor, next_sibling: Tensor) -> None:
    """Children and siblings come after their node (topological order), so walks end."""
    if not _values_checkable(next_token) or next_token.numel() == 0:
        return
    N = next_token.shape[1]
    node = torch.arange(N)
    for arg, link in (("next_token", next_token), ("next_sibling", next_sibling)):
        bad = (link != -1) & ((link <= node) | (link >= N))
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"{op}: {arg} values must be -1 or a later node in (i, N) = ({i}, {N}), "
                             f"got {arg}[{b}, {i}] = {int(link[b, i])}")


def _check_tree_verify_greedy(candidates, target_predict, next_token, next_sibling) -> None:
    op = "tree_verify_greedy"
    check_tensor(op, "candidates", candidates, [("B", None), ("N", None)], (torch.int64,))
    B, N = candidates.shape
    dev = candidates.device
    for name, t in (("target_predict", target_predict), ("next_token", next_token), ("next_sibling", next_sibling)):
        check_tensor(op, name, t, [("B", B), ("N", N)], (torch.int64,), dev)
    if N == 0:
        raise ValueError(f"{op}: candidates must hold at least the root node (N >= 1), got N = 0")
    _check_tree_links(op, next_token, next_sibling)


def _check_tree_verify_sample(candidates, target_probs, draft_probs, next_token, next_sibling,
                              uniform_accept, uniform_final) -> None:
    op = "tree_verify_sample"
    check_tensor(op, "candidates", candidates, [("B", None), ("N", None)], (torch.int64,))
    B, N = candidates.shape
    dev = candidates.device
    check_tensor(op, "target_probs", target_probs, [("B", B), ("N", N), ("V", None)], (torch.float32,), dev)
    V = target_probs.shape[2]
    check_tensor(op, "draft_probs", draft_probs, [("B", B), ("N", N), ("V", V)], (torch.float32,), dev)
    for name, t in (("target_probs", target_probs), ("draft_probs", draft_probs)):
        _check_last_dim_contiguous(op, name, t)
    for name, t in (("next_token", next_token), ("next_sibling", next_sibling)):
        check_tensor(op, name, t, [("B", B), ("N", N)], (torch.int64,), dev)
    check_tensor(op, "uniform_accept", uniform_accept, [("B", B), ("N", N)], (torch.float32,), dev)
    check_tensor(op, "uniform_final", uniform_final, [("B", B)], (torch.float32,), dev)
    if N == 0 or V == 0:
        raise ValueError(f"{op}: need N >= 1 nodes and V >= 1 tokens, got N = {N}, V = {V}")
    if _values_checkable(candidates) and candidates.numel() > 0:
        # the root's token is never looked up; every other node's must index the vocabulary
        bad = (candidates[:, 1:] < 0) | (candidates[:, 1:] >= V)
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"{op}: candidates values must be in [0, V) = [0, {V}), "
                             f"got candidates[{b}, {i + 1}] = {int(candidates[b, i + 1])}")
    _check_tree_links(op, next_token, next_sibling)
    if _values_checkable(candidates):
        for name, t in (("target_probs", target_probs), ("draft_probs", draft_probs)):
            _check_values(op, name, t, torch.isfinite(t) & (t >= 0), "finite and >= 0")
        for name, t in (("uniform_accept", uniform_accept), ("uniform_final", uniform_final)):
            _check_values(op, name, t, (t >= 0) & (t < 1), "in [0, 1)")


def _check_values(op: str, arg: str, t: Tensor, ok: Tensor, expected: str) -> None:
    """Raise naming the first element of `t` where `ok` is False."""
    if t.numel() > 0 and not bool(ok.all()):
        where = [int(i) for i in (~ok).nonzero()[0]]
        raise ValueError(f"{op}: {arg} values must be {expected}, got {arg}{where} = {float(t[tuple(where)])}")


def _check_kv_compact(kv, prefix_len, accept_index, accept_len) -> None:
    op = "kv_compact"
    # any dtype: the kernels move elements and do no arithmetic
    check_tensor(op, "kv", kv, [("L", None), ("B", None), ("H", None), ("S", None), ("D", None)],
                  (kv.dtype,) if isinstance(kv, Tensor) else ())
    if not kv.is_contiguous():
        raise ValueError(f"{op}: kv must be contiguous, got strides {list(kv.stride())}")
    L, B, H, S, D = kv.shape
    dev = kv.device
    check_tensor(op, "prefix_len", prefix_len, [("B", B)], (torch.int64,), dev)
    check_tensor(op, "accept_index", accept_index, [("B", B), ("A", None)], (torch.int64,), dev)
    A = accept_index.shape[1]
    check_tensor(op, "accept_len", accept_len, [("B", B)], (torch.int64,), dev)
    if not _values_checkable(kv) or B == 0:
        return
    for b in range(B):
        n_keep, start = int(accept_len[b]), int(prefix_len[b])
        if not 0 <= n_keep <= A:
            raise ValueError(f"{op}: accept_len values must be in [0, A] = [0, {A}], got accept_len[{b}] = {n_keep}")
        if start < 0:
            raise ValueError(f"{op}: prefix_len values must be >= 0, got prefix_len[{b}] = {start}")
        kept = accept_index[b, :n_keep]
        if n_keep > 0 and int(kept[0]) < 0:
            raise ValueError(f"{op}: accept_index values must be >= 0 within accept_len, "
                             f"got accept_index[{b}, 0] = {int(kept[0])}")
        if n_keep > 1 and bool((kept[1:] <= kept[:-1]).any()):
            i = int((kept[1:] <= kept[:-1]).nonzero()[0, 0]) + 1
            raise ValueError(f"{op}: accept_index must be strictly increasing within accept_len, "
                             f"got accept_index[{b}, {i - 1}:{i + 1}] = {kept[i - 1:i + 1].tolist()}")
        # compared without adding, as csrc/checks.h (int64 sums there could overflow)
        if n_keep > 0 and not (start < S and int(kept[-1]) < S - start):
            raise ValueError(f"{op}: prefix_len[b] + accept_index[b, i] must be < S = {S}, got prefix_len[{b}] = "
                             f"{start} and accept_index[{b}, {n_keep - 1}] = {int(kept[-1])}")


# ----------------------------------------------------------------------------- fake impls
# They validate shapes/dtypes/devices too, so tracing (torch.compile, meta tensors) reports
# the same errors as the kernels; value checks are skipped for fake and meta tensors.
@torch.library.register_fake("sparrow::window_attn")
def _window_attn_fake(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale):
    _check_window_attn(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale)
    B, Hq, Tq, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, Hq, Tq), dtype=lse_dtype)


@torch.library.register_fake("sparrow::window_attn_backward")
def _window_attn_backward_fake(grad_out, q, k, v, out, lse, kv_len, q_pos, window, n_anchor, tree_mask, scale):
    _check_window_attn_backward(grad_out, q, k, v, out, lse, kv_len, q_pos, window, n_anchor, tree_mask, scale)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@torch.library.register_fake("sparrow::gather_hidden")
def _gather_hidden_fake(hidden, index):
    _check_gather_hidden(hidden, index)
    B, N = index.shape
    return hidden[0].new_empty((B, N, len(hidden) * hidden[0].shape[-1]))


def _tree_verify_fake_outputs(candidates):
    B, N = candidates.shape
    return (candidates.new_empty((B, N), dtype=torch.int64), candidates.new_empty((B,), dtype=torch.int64),
            candidates.new_empty((B,), dtype=torch.int64))


@torch.library.register_fake("sparrow::tree_verify_greedy")
def _tree_verify_greedy_fake(candidates, target_predict, next_token, next_sibling):
    _check_tree_verify_greedy(candidates, target_predict, next_token, next_sibling)
    return _tree_verify_fake_outputs(candidates)


@torch.library.register_fake("sparrow::tree_verify_sample")
def _tree_verify_sample_fake(candidates, target_probs, draft_probs, next_token, next_sibling,
                             uniform_accept, uniform_final):
    _check_tree_verify_sample(candidates, target_probs, draft_probs, next_token, next_sibling, uniform_accept,
                              uniform_final)
    return _tree_verify_fake_outputs(candidates)


@torch.library.register_fake("sparrow::kv_compact")
def _kv_compact_fake(kv, prefix_len, accept_index, accept_len):
    _check_kv_compact(kv, prefix_len, accept_index, accept_len)
    return None


# ----------------------------------------------------------------------------- autograd
def _window_attn_setup_context(ctx, inputs, output):
    q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_len, q_pos, tree_mask)
    ctx.window, ctx.n_anchor, ctx.scale = window, n_anchor, scale
    ctx.mark_non_differentiable(lse)  # lse is an auxiliary output; the backward op takes d(out) only


def _window_attn_autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_len, q_pos, tree_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.sparrow.window_attn_backward(
        grad_out.contiguous(), q, k, v, out, lse, kv_len, q_pos, ctx.window, ctx.n_anchor, tree_mask, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("sparrow::window_attn", _window_attn_autograd_backward,
                                setup_context=_window_attn_setup_context)


# ----------------------------------------------------------------------------- Triton as CUDA kernels
def _triton():
    """The Triton kernels module, imported on first use (importing triton is slow)."""
    from .. import triton_ops
    return triton_ops


def _triton_kernel(name: str):
    def kernel(*args):
        with torch.no_grad():  # the op's own autograd registration handles gradients
            return getattr(_triton(), name)(*args)
    kernel.__name__ = f"triton_{name}"
    return kernel


def _missing_kernel(name: str, why: str):
    def kernel(*args):
        raise RuntimeError(f"{name}: no CUDA kernel: {why}")
    kernel.__name__ = f"missing_cuda_{name}"
    return kernel


def cuda_kernel_plan(cpp_cuda_ops, triton_available: bool) -> dict[str, str]:
    """What serves each op on CUDA tensors: 'cpp', 'triton' or 'missing' (an error when called).
    A build with CUDA must have every op of backend.CPP_CUDA_REQUIRED in C++: one it lacks is
    'missing', never quietly Triton; window_attn_backward is Triton's by design. A CPU-only
    build (no C++ CUDA kernel at all) runs every op on Triton."""
    cpp_cuda_ops = frozenset(cpp_cuda_ops)
    if not cpp_cuda_ops:
        return {n: "triton" if triton_available else "missing" for n in OP_NAMES}
    plan = {n: "cpp" if n in cpp_cuda_ops else "missing" for n in _backend.CPP_CUDA_REQUIRED}
    for n in _backend.TRITON_CUDA_BY_DESIGN:
        plan[n] = "cpp" if n in cpp_cuda_ops else ("triton" if triton_available else "missing")
    return plan


def _register_triton_cuda_kernels(lib: torch.library.Library | None = None, force: bool = False) -> list[str]:
    """Register the non-C++ CUDA kernels of cuda_kernel_plan: Triton's where planned, an error
    naming the cause where an op is missing. A CUDA build registers at import even without a
    GPU (so the dispatcher shows every op); a CPU-only build only when CUDA and triton are
    available (`force` for tests; `lib` ties the registrations' lifetime). Returns the names
    given Triton kernels."""
    triton_ok = _backend.triton_importable()
    if not CPP_CUDA_OPS and not force and (not torch.cuda.is_available() or not triton_ok):
        return []
    registered = []
    for name, what in cuda_kernel_plan(CPP_CUDA_OPS, triton_ok or force).items():
        if what == "triton":
            torch.library.register_kernel(f"sparrow::{name}", "cuda", _triton_kernel(name), lib=lib)
            registered.append(name)
        elif what == "missing":
            why = ("its CUDA kernel is Triton's, and the triton package is not installed"
                   if name in _backend.TRITON_CUDA_BY_DESIGN else
                   "sparrow_kernels._C was built with CUDA but did not register this op's C++ CUDA kernel "
                   "(an incomplete build; rebuild with SPARROW_CUDA=1 pip install -e . --no-build-isolation)")
            torch.library.register_kernel(f"sparrow::{name}", "cuda", _missing_kernel(name, why), lib=lib)
    return registered


CPP_CUDA_OPS = frozenset(n for n in OP_NAMES if torch._C._dispatch_has_kernel_for_dispatch_key(f"sparrow::{n}", "CUDA"))
_backend.record_cpp_cuda_ops(CPP_CUDA_OPS)
TRITON_CUDA_OPS = _register_triton_cuda_kernels()


# ----------------------------------------------------------------------------- Python front
_CHECKS = {"window_attn": _check_window_attn, "window_attn_backward": _check_window_attn_backward,
           "gather_hidden": _check_gather_hidden, "tree_verify_greedy": _check_tree_verify_greedy,
           "tree_verify_sample": _check_tree_verify_sample, "kv_compact": _check_kv_compact}


def _dispatch(op: str, device: torch.device, args: tuple, check_args: tuple | None = None):
    """Run `op` on the selected backend: the C++ ops (cpu, cuda) validate in csrc/checks.h;
    the Python backends (reference, triton) are validated here first (on `check_args`, the
    caller's arguments as given, default `args`), with the same words."""
    name = _backend.resolve(device)
    if name in ("cpu", "cuda"):
        return getattr(torch.ops.sparrow, op)(*args)
    _CHECKS[op](*(args if check_args is None else check_args))
    impl = _reference if name == "reference" else _triton()
    return getattr(impl, op)(*args)


def window_attn(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor, q_pos: Tensor, window: int = 0,
                n_anchor: int = 0, tree_mask: Tensor | None = None, scale: float = 0.0) -> tuple[Tensor, Tensor]:
    """Text-anchored window attention (docs/ops.md): returns out [B, Hq, Tq, D] and
    lse [B, Hq, Tq] float32. Differentiable w.r.t. q, k, v on every backend."""
    return _dispatch("window_attn", q.device, (q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale))


def window_attn_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         kv_len: Tensor, q_pos: Tensor, window: int = 0, n_anchor: int = 0,
                         tree_mask: Tensor | None = None, scale: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of window_attn's out (dk, dv summed over each GQA group)."""
    args = (grad_out, q, k, v, out, lse, kv_len, q_pos, window, n_anchor, tree_mask, scale)
    return _dispatch("window_attn_backward", q.device, args)


def gather_hidden(hidden: list[Tensor], index: Tensor) -> Tensor:
    """Gather rows `index [B, N]` (-1 = zeros) of every layer's `[B, T, H]` hidden states
    and concatenate along features: [B, N, n_layers * H]."""
    return _dispatch("gather_hidden", index.device, (list(hidden), index), check_args=(hidden, index))


def tree_verify_greedy(candidates: Tensor, target_predict: Tensor, next_token: Tensor,
                       next_sibling: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy tree acceptance: (accept_index [B, N], accept_len [B], bonus_token [B])."""
    return _dispatch("tree_verify_greedy", candidates.device, (candidates, target_predict, next_token, next_sibling))


def tree_verify_sample(candidates: Tensor, target_probs: Tensor, draft_probs: Tensor, next_token: Tensor,
                       next_sibling: Tensor, uniform_accept: Tensor,
                       uniform_final: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lossless stochastic tree acceptance with the caller's uniforms:
    (accept_index [B, N], accept_len [B], bonus_token [B])."""
    args = (candidates, target_probs, draft_probs, next_token, next_sibling, uniform_accept, uniform_final)
    accept_index, accept_len, bonus_token = _dispatch("tree_verify_sample", candidates.device, args)
    if _values_checkable(bonus_token) and bool((bonus_token < 0).any()):
        # Triton's kernel marks an all-zero residual with -1 (a kernel cannot raise); the CPU raises
        b = int((bonus_token < 0).nonzero()[0, 0])
        node = int(accept_index[b, int(accept_len[b]) - 1])
        raise ValueError(f"tree_verify_sample: target_probs[{b}, {node}] must have positive mass to sample the "
                         "bonus token, got an all-zero row")
    return accept_index, accept_len, bonus_token


def kv_compact(kv: Tensor, prefix_len: Tensor, accept_index: Tensor, accept_len: Tensor) -> None:
    """In place: move the accepted nodes' slots of every layer of `kv [L, B, H, S, D]` to
    the slots right after each row's committed prefix."""
    _dispatch("kv_compact", kv.device, (kv, prefix_len, accept_index, accept_len))
