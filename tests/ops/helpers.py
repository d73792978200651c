"""Test helpers shared by the op tests: random trees, hypothesis case strategies, input
builders that poison what must not be read, and tolerances derived from arithmetic.
Holds no assertions about any backend by itself; the tests in this folder use it.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.utils.deterministic
from hypothesis import strategies as st

from sparrow_kernels.ops import reference

LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- trees
def random_parents(n_nodes: int, gen: torch.Generator) -> list[int]:
    """A random tree in topological order: parents[0] = -1 (root), parents[i] < i."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n_nodes)]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[N, N] bool: mask[i, j] iff j is i or an ancestor of i."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
    return mask


def depths(parents: list[int]) -> list[int]:
    out = []
    for i, p in enumerate(parents):
        out.append(0 if p == -1 else out[p] + 1)
    return out


def branch(parents: list[int], node: int) -> list[int]:
    """Root-to-node path [0, ..., node]."""
    path = []
    while node != -1:
        path.append(node)
        node = parents[node]
    return path[::-1]


def tree_links(parents: list[int]) -> tuple[list[int], list[int]]:
    """Linked-list layout: first child and next sibling of each node (children in index order)."""
    n = len(parents)
    first_child, next_sibling = [-1] * n, [-1] * n
    last_child = [-1] * n
    for i in range(1, n):
        p = parents[i]
        if first_child[p] == -1:
            first_child[p] = i
        else:
            next_sibling[last_child[p]] = i
        last_child[p] = i
    return first_child, next_sibling


# ----------------------------------------------------------------------------- window_attn cases
@dataclass(frozen=True)
class WindowCase:
    B: int
    Hkv: int
    group: int
    D: int
    Tq: int
    Tk: int
    kv_len: tuple[int, ...]
    window: int
    n_anchor: int
    tree: bool
    random_pos: bool
    strided: bool
    scale: float
    seed: int

    @property
    def Hq(self) -> int:
        return self.Hkv * self.group


@st.composite
def window_cases(draw, max_batch=3, max_kv_heads=2, max_group=4, head_dims=(16, 24, 32, 64, 80, 128),
                 max_tq=9, max_extra_keys=12, trees=True):
    B = draw(st.integers(1, max_batch))
    Hkv = draw(st.integers(1, max_kv_heads))
    group = draw(st.integers(1, max_group))
    D = draw(st.sampled_from(head_dims))
    Tq = draw(st.integers(1, max_tq))
    tree = trees and Tq > 1 and draw(st.booleans())
    min_len = Tq if tree else 1
    Tk = draw(st.integers(min_len, Tq + max_extra_keys))
    kv_len = tuple(draw(st.lists(st.integers(min_len, Tk), min_size=B, max_size=B)))
    window = draw(st.one_of(st.sampled_from([0, -1, 1, 2]), st.integers(1, Tk + 3)))
    n_anchor = draw(st.one_of(st.just(0), st.integers(0, min(Tk + 1, 6))))
    random_pos = (not tree) and draw(st.integers(0, 3)) == 0
    return WindowCase(B, Hkv, group, D, Tq, Tk, kv_len, window, n_anchor, tree, random_pos,
                      strided=draw(st.booleans()), scale=draw(st.sampled_from([0.0, 0.125, 0.6])),
                      seed=draw(st.integers(0, 2**31 - 1)))


@dataclass
class WindowInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_len: torch.Tensor
    q_pos: torch.Tensor
    window: int
    n_anchor: int
    tree_mask: torch.Tensor | None
    scale: float
    parents: list[list[int]] | None

    def args(self):
        return (self.q, self.k, self.v, self.kv_len, self.q_pos, self.window, self.n_anchor,
                self.tree_mask, self.scale)

    def to(self, device=None, dtype=None) -> "WindowInputs":
        def conv(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return WindowInputs(conv(self.q), conv(self.k), conv(self.v), self.kv_len.to(device),
                            self.q_pos.to(device), self.window, self.n_anchor,
                            None if self.tree_mask is None else self.tree_mask.to(device),
                            self.scale, self.parents)


def make_window_inputs(case: WindowCase, dtype: torch.dtype, device) -> WindowInputs:
    """Random q/k/v for a case. Key slots past kv_len[b] hold NaN (they are not valid keys and
    must never reach an output). When case.strided, q is a [B, Tq, Hq, D] buffer seen as
    [B, Hq, Tq, D] and k/v are the first Tk slots of a larger cache: only the last dim is
    contiguous, as the contract allows."""
    gen = torch.Generator().manual_seed(case.seed)
    B, Hq, Hkv, Tq, Tk, D = case.B, case.Hq, case.Hkv, case.Tq, case.Tk, case.D
    q = torch.randn(B, Hq, Tq, D, generator=gen)                                       # [B, Hq, Tq, D]
    k = torch.randn(B, Hkv, Tk, D, generator=gen)                                      # [B, Hkv, Tk, D]
    v = torch.randn(B, Hkv, Tk, D, generator=gen)
    kv_len = torch.tensor(case.kv_len, dtype=torch.int64)                              # [B]
    for b, n in enumerate(case.kv_len):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    tree_mask, parents = None, None
    if case.tree:
        parents = [random_parents(Tq, gen) for _ in range(B)]
        tree_mask = torch.stack([ancestor_mask(p) for p in parents])                  # [B, Tq, Tq]
        depth = torch.tensor([depths(p) for p in parents], dtype=torch.int64)          # [B, Tq]
        q_pos = (kv_len - Tq)[:, None] + depth                                          # [B, Tq]
    elif case.random_pos:
        q_pos = torch.randint(-2, Tk + 3, (B, Tq), generator=gen)
    else:
        q_pos = (kv_len - Tq)[:, None] + torch.arange(Tq)[None, :]                     # [B, Tq]
    inputs = WindowInputs(q, k, v, kv_len, q_pos, case.window, case.n_anchor, tree_mask, case.scale, parents)
    inputs = inputs.to(device=device, dtype=dtype)
    if case.strided:
        inputs.q = inputs.q.transpose(1, 2).contiguous().transpose(1, 2)              # storage [B, Tq, Hq, D]
        inputs.k = slots_of_larger_cache(inputs.k, extra_slots=3)
        inputs.v = slots_of_larger_cache(inputs.v, extra_slots=3)
    return inputs


def slots_of_larger_cache(t: torch.Tensor, extra_slots: int) -> torch.Tensor:
    """The same values as `t [B, H, T, D]`, seen as the first T slots of a NaN-filled
    `[B, H, T + extra_slots, D]` cache (non-contiguous, last dim contiguous)."""
    B, H, T, D = t.shape
    cache = torch.full((B, H, T + extra_slots, D), float("nan"), dtype=t.dtype, device=t.device)
    cache[:, :, :T].copy_(t)
    return cache[:, :, :T]


def window_attn_low_precision(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale):
    """The reference as a flash-attention kernel computes it in q's dtype: scores and the
    softmax statistics in fp32, the unnormalised probabilities rounded to q's dtype before
    the product with V, the output rounded at the end. Used to size low-precision tolerances."""
    D = q.shape[-1]
    scale = scale if scale > 0 else 1.0 / math.sqrt(D)
    group = q.shape[1] // k.shape[1]
    keys = k.float().repeat_interleave(group, 1)                                       # [B, Hq, Tk, D]
    values = v.float().repeat_interleave(group, 1)
    values = torch.nan_to_num(values)  # masked slots must contribute 0 * v, not 0 * NaN
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), torch.nan_to_num(keys)) * scale
    visible = reference.window_visibility(kv_len, q_pos, k.shape[2], window, n_anchor, tree_mask)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)                                              # [B, Hq, Tq, Tk]
    denom = weights.sum(-1, keepdim=True)
    out = torch.einsum("bhqk,bhkd->bhqd", weights.to(q.dtype).float(), values)
    out = out / torch.where(denom == 0, torch.ones_like(denom), denom)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------- tolerances
def low_precision_violations(result: torch.Tensor, gold: torch.Tensor, low_ref: torch.Tensor,
                             dtype: torch.dtype) -> torch.Tensor:
    """bool [rows]: the rows (every index but the last dim) that break FlashAttention's rule,
    applied per row: the kernel's max abs error vs a high-precision gold may be at most 2x the
    error of the reference computed in the same low precision, plus one ulp of the row's own
    scale (so that a lucky exact low-precision reference does not fail). Per row, because one
    tensor-wide maximum lets a row that drops a key hide under another row's rounding error."""
    result, gold, low_ref = (t.double().reshape(-1, t.shape[-1]) for t in (result, gold, low_ref))
    err = (result - gold).abs().amax(dim=-1)                               # [rows]
    ref_err = (low_ref - gold).abs().amax(dim=-1)
    ulp = torch.finfo(dtype).eps * (1.0 + gold.abs().amax(dim=-1))
    return ~(err <= 2 * ref_err + ulp)


def assert_within_low_precision_error(name: str, result: torch.Tensor, gold: torch.Tensor,
                                      low_ref: torch.Tensor, dtype: torch.dtype) -> None:
    """low_precision_violations must find no row (and no NaN)."""
    assert not torch.isnan(result).any(), f"{name}: NaN in the result"
    if result.numel() == 0:
        return
    bad = low_precision_violations(result, gold, low_ref, dtype)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        r, g, lo = (t.double().reshape(-1, t.shape[-1])[row] for t in (result, gold, low_ref))
        err, ref_err = (r - g).abs().max().item(), (lo - g).abs().max().item()
        ulp = torch.finfo(dtype).eps * (1.0 + g.abs().max().item())
        raise AssertionError(f"{name}: row {row} (of {bad.numel()}, {int(bad.sum())} failing): max error {err:.3g} "
                             f"vs gold exceeds 2 x the low-precision reference's {ref_err:.3g} + {ulp:.3g}")


def assert_close_fp32(name: str, result: torch.Tensor, gold: torch.Tensor, atol=2e-5, rtol=2e-5) -> None:
    torch.testing.assert_close(result.double(), gold.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- poisoning
def poison_allocator(device: torch.device, n_bytes: int = 1 << 22) -> None:
    """Fill, then free, a block of memory with NaN so that an output buffer allocated next
    by the CUDA caching allocator starts as NaN rather than zeros. (On the CPU small buffers
    come from malloc's bins and rarely reuse this block: use `poisoned_outputs` there.)"""
    junk = torch.full((n_bytes // 4,), float("nan"), dtype=torch.float32, device=device)
    del junk


@contextlib.contextmanager
def poisoned_outputs(device: torch.device):
    """Every tensor allocated inside (by torch.empty in Python or at::empty in C++/CUDA
    kernels) starts as NaN (floats) or the largest integer, via PyTorch's deterministic mode
    (`fill_uninitialized_memory`, warn-only so no op is refused); plus `poison_allocator`.
    A kernel that leaves part of an output unwritten then fails the comparison."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    poison_allocator(device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "... does not have a deterministic implementation"
            yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
