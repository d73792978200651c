"""Triton kernels for `tree_verify_greedy` and `tree_verify_sample`: walk a draft token tree
(linked-list layout: first child / next sibling) from the root, one program per row.

Sampling follows docs/ops.md's arithmetic step by step with the caller's uniforms, so
the accept paths match the reference; the residual distribution lives in a [B, V] float32
scratch buffer. No validation beyond keeping the walks in bounds (the ops front checks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2


@triton.jit
def _gather_scalar(vector, offs, index):
    """vector[index] for a register vector (index is a scalar)."""
    return tl.sum(tl.where(offs == index, vector, 0), axis=0)


# ----------------------------------------------------------------------------- greedy
@triton.jit
def _tree_verify_greedy_kernel(candidates_ptr, predict_ptr, first_child_ptr, next_sibling_ptr,
                               accept_index_ptr, accept_len_ptr, bonus_ptr,
                               N, stride_cb, stride_pb, stride_fb, stride_sb, stride_ab,
                               BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    in_row = offs < N
    tokens = tl.load(candidates_ptr + b * stride_cb + offs, mask=in_row, other=-1)     # [BLOCK_N]
    predict = tl.load(predict_ptr + b * stride_pb + offs, mask=in_row, other=-1)
    first_child = tl.load(first_child_ptr + b * stride_fb + offs, mask=in_row, other=-1)
    sibling = tl.load(next_sibling_ptr + b * stride_sb + offs, mask=in_row, other=-1)
    # range-tested in int64 before narrowing, so no out-of-range link aliases a node
    first_child = tl.where((first_child >= 0) & (first_child < N), first_child, -1).to(tl.int32)
    sibling = tl.where((sibling >= 0) & (sibling < N), sibling, -1).to(tl.int32)

    path = tl.where(offs == 0, 0, -1)                              # [BLOCK_N] accepted nodes
    cur = 0
    n_accept = 1
    walking = 1
    while walking > 0:
        want = _gather_scalar(predict, offs, cur)
        child = _gather_scalar(first_child, offs, cur)
        match = -1
        scanned = 0
        while (child >= 0) & (match < 0) & (scanned < N):
            token = _gather_scalar(tokens, offs, child)
            match = tl.where(token == want, child, -1)
            child = _gather_scalar(sibling, offs, child)
            scanned += 1
        if (match > cur) & (n_accept < N):                         # topological order: child > parent
            path = tl.where(offs == n_accept, match, path)
            n_accept += 1
            cur = match
        else:
            walking = 0
    bonus = _gather_scalar(predict, offs, cur)
    tl.store(accept_index_ptr + b * stride_ab + offs, path.to(tl.int64), mask=in_row)
    tl.store(accept_len_ptr + b, n_accept.to(tl.int64))
    tl.store(bonus_ptr + b, bonus.to(tl.int64))


def tree_verify_greedy(candidates: torch.Tensor, target_predict: torch.Tensor, next_token: torch.Tensor,
                       next_sibling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree acceptance. Returns accept_index [B, N] (path from node 0, padded -1),
    accept_len [B] (>= 1, counts the root) and bonus_token [B] (target argmax at the last node)."""
    B, N = _check_tree(candidates, next_token, next_sibling, "tree_verify_greedy")
    if tuple(target_predict.shape) != (B, N):
        raise ValueError(f"tree_verify_greedy (triton): target_predict must have shape [{B}, {N}], "
                         f"got {list(target_predict.shape)}")
    device = candidates.device
    accept_index = torch.empty((B, N), dtype=torch.int64, device=device)   # [B, N]
    accept_len = torch.empty((B,), dtype=torch.int64, device=device)       # [B]
    bonus_token = torch.empty((B,), dtype=torch.int64, device=device)      # [B]
    if B == 0:
        return accept_index, accept_len, bonus_token
    candidates, target_predict, next_token, next_sibling = (
        _row_contiguous(t) for t in (candidates, target_predict, next_token, next_sibling))
    _tree_verify_greedy_kernel[(B,)](
        candidates, target_predict, next_token, next_sibling, accept_index, accept_len, bonus_token,
        N, candidates.stride(0), target_predict.stride(0), next_token.stride(0), next_sibling.stride(0),
        accept_index.stride(0), BLOCK_N=max(16, next_pow2(N)), num_warps=1)
    return accept_index, accept_len, bonus_token


# ----------------------------------------------------------------------------- sampling
@triton.jit
def _row_sum(row_ptr, V, BLOCK_V: tl.constexpr):
    """sum(row[0:V]) in float32, chunk by chunk."""
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        total += tl.load(row_ptr + offs, mask=offs < V, other=0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _reject_with_draft(p_ptr, q_ptr, out_ptr, S, Q, V, BLOCK_V: tl.constexpr):
    """out = max(p / S - q / Q, 0) (out may alias p); returns sum(out)."""
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_v = offs < V
        p = tl.load(p_ptr + offs, mask=in_v, other=0.0)
        q = tl.load(q_ptr + offs, mask=in_v, other=0.0)
        residual = tl.maximum(tl.math.div_rn(p, S) - tl.math.div_rn(q, Q), 0.0)
        tl.store(out_ptr + offs, residual, mask=in_v)
        total += tl.where(in_v, residual, 0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _reject_target_only(p_ptr, out_ptr, token, V, BLOCK_V: tl.constexpr):
    """out = p with out[token] = 0 (out may alias p); returns sum(out)."""
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_v = offs < V
        p = tl.load(p_ptr + offs, mask=in_v, other=0.0)
        residual = tl.where(offs == token, 0.0, p)
        tl.store(out_ptr + offs, residual, mask=in_v)
        total += residual
    return tl.sum(total, axis=0)


@triton.jit
def _sample_inverse_cdf(p_ptr, threshold, V, BLOCK_V: tl.constexpr):
    """First t with cumsum(p)[t] > threshold; the last t with p[t] > 0 if there is none
    (rounding ran past the end); -1 if p has no positive mass (the ops front raises for CPU
    tensors, as the C++ kernel; CUDA callers see bonus_token = -1, as from the CUDA kernel)."""
    found = -1
    last_positive = -1
    running = 0.0
    start = 0
    while (start < V) & (found < 0):
        offs = start + tl.arange(0, BLOCK_V)
        in_v = offs < V
        p = tl.load(p_ptr + offs, mask=in_v, other=0.0)
        cdf = tl.cumsum(p, axis=0) + running
        first_here = tl.min(tl.where((cdf > threshold) & in_v, offs, 2147483647), axis=0)
        found = tl.where(first_here < 2147483647, first_here, -1)
        last_positive = tl.maximum(last_positive, tl.max(tl.where((p > 0.0) & in_v, offs, -1), axis=0))
        running += tl.sum(p, axis=0)
        start += BLOCK_V
    return tl.where(found >= 0, found, last_positive)


@triton.jit
def _tree_verify_sample_kernel(candidates_ptr, target_ptr, draft_ptr, first_child_ptr,
                               next_sibling_ptr, uniform_accept_ptr, uniform_final_ptr, residual_ptr,
                               accept_index_ptr, accept_len_ptr, bonus_ptr,
                               N, V, stride_cb, stride_tb, stride_tn, stride_db, stride_dn,
                               stride_fb, stride_sb, stride_ub, stride_ab,
                               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    in_row = offs < N
    tokens = tl.load(candidates_ptr + b * stride_cb + offs, mask=in_row, other=0)
    tokens = tl.where((tokens >= 0) & (tokens < V), tokens, 0).to(tl.int32)
    first_child = tl.load(first_child_ptr + b * stride_fb + offs, mask=in_row, other=-1)
    sibling = tl.load(next_sibling_ptr + b * stride_sb + offs, mask=in_row, other=-1)
    # range-tested in int64 before narrowing, so no out-of-range link aliases a node
    first_child = tl.where((first_child >= 0) & (first_child < N), first_child, -1).to(tl.int32)
    sibling = tl.where((sibling >= 0) & (sibling < N), sibling, -1).to(tl.int32)
    coins = tl.load(uniform_accept_ptr + b * stride_ub + offs, mask=in_row, other=0.0).to(tl.float32)
    residual_row = residual_ptr + b * V                            # scratch [V] of this row

    path = tl.where(offs == 0, 0, -1)                              # [BLOCK_N] accepted nodes
    cur = 0
    n_accept = 1
    walking = 1
    S = 0.0
    p_is_target = 1        # the residual p is target_probs[cur] itself (not yet in scratch)
    while walking > 0:
        target_row = target_ptr + b * stride_tb + cur * stride_tn
        draft_row = draft_ptr + b * stride_db + cur * stride_dn
        S = _row_sum(target_row, V, BLOCK_V)
        Q = _row_sum(draft_row, V, BLOCK_V)
        p_is_target = 1
        child = _gather_scalar(first_child, offs, cur)
        accepted = -1
        scanned = 0
        while (child >= 0) & (accepted < 0) & (scanned < N):
            x = _gather_scalar(tokens, offs, child)
            u = _gather_scalar(coins, offs, child)
            if p_is_target > 0:
                px = tl.load(target_row + x)
            else:
                px = tl.load(residual_row + x)
            if Q > 0.0:
                qx = tl.load(draft_row + x)
                accept = u * qx * S < px * Q
            else:
                accept = u * S < px
            if accept:
                accepted = child
            else:
                if Q > 0.0:
                    if p_is_target > 0:
                        S = _reject_with_draft(target_row, draft_row, residual_row, S, Q, V, BLOCK_V)
                    else:
                        S = _reject_with_draft(residual_row, draft_row, residual_row, S, Q, V, BLOCK_V)
                else:
                    if p_is_target > 0:
                        S = _reject_target_only(target_row, residual_row, x, V, BLOCK_V)
                    else:
                        S = _reject_target_only(residual_row, residual_row, x, V, BLOCK_V)
                p_is_target = 0
                tl.debug_barrier()                                 # scratch writes visible to all lanes
                if S <= 0.0:                                       # numerical guard: restore the target
                    p_is_target = 1
                    S = _row_sum(target_row, V, BLOCK_V)
                child = _gather_scalar(sibling, offs, child)
            scanned += 1
        if (accepted > cur) & (n_accept < N):                      # topological order: child > parent
            path = tl.where(offs == n_accept, accepted, path)
            n_accept += 1
            cur = accepted
        else:
            walking = 0
    threshold = tl.load(uniform_final_ptr + b).to(tl.float32) * S
    if p_is_target > 0:
        bonus = _sample_inverse_cdf(target_ptr + b * stride_tb + cur * stride_tn, threshold, V, BLOCK_V)
    else:
        bonus = _sample_inverse_cdf(residual_row, threshold, V, BLOCK_V)
    tl.store(accept_index_ptr + b * stride_ab + offs, path.to(tl.int64), mask=in_row)
    tl.store(accept_len_ptr + b, n_accept.to(tl.int64))
    tl.store(bonus_ptr + b, bonus.to(tl.int64))


def tree_verify_sample(candidates: torch.Tensor, target_probs: torch.Tensor, draft_probs: torch.Tensor,
                       next_token: torch.Tensor, next_sibling: torch.Tensor, uniform_accept: torch.Tensor,
                       uniform_final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless stochastic tree acceptance with the caller's uniforms (recursive rejection
    sampling where draft_probs[b, i] is known, target-only rejection where it sums to 0).
    Returns accept_index [B, N], accept_len [B], bonus_token [B]."""
    B, N = _check_tree(candidates, next_token, next_sibling, "tree_verify_sample")
    if target_probs.dim() != 3 or tuple(target_probs.shape[:2]) != (B, N) or draft_probs.shape != target_probs.shape:
        raise ValueError(f"tree_verify_sample (triton): target_probs and draft_probs must have shape "
                         f"[{B}, {N}, V], got {list(target_probs.shape)} and {list(draft_probs.shape)}")
    if tuple(uniform_accept.shape) != (B, N) or tuple(uniform_final.shape) != (B,):
        raise ValueError(f"tree_verify_sample (triton): uniform_accept must have shape [{B}, {N}] and "
                         f"uniform_final [{B}], got {list(uniform_accept.shape)} and {list(uniform_final.shape)}")
    V = target_probs.shape[2]
    device = candidates.device
    accept_index = torch.empty((B, N), dtype=torch.int64, device=device)   # [B, N]
    accept_len = torch.empty((B,), dtype=torch.int64, device=device)       # [B]
    bonus_token = torch.empty((B,), dtype=torch.int64, device=device)      # [B]
    if B == 0:
        return accept_index, accept_len, bonus_token
    target_probs = _row_contiguous(target_probs.float())
    draft_probs = _row_contiguous(draft_probs.float())
    candidates, next_token, next_sibling, uniform_accept = (
        _row_contiguous(t) for t in (candidates, next_token, next_sibling, uniform_accept))
    uniform_final = uniform_final.contiguous()
    residual = torch.empty((B, V), dtype=torch.float32, device=device)     # [B, V] scratch
    block_v = min(next_pow2(max(V, 16)), 4096)
    _tree_verify_sample_kernel[(B,)](
        candidates, target_probs, draft_probs, next_token, next_sibling, uniform_accept, uniform_final,
        residual, accept_index, accept_len, bonus_token,
        N, V, candidates.stride(0), target_probs.stride(0), target_probs.stride(1),
        draft_probs.stride(0), draft_probs.stride(1), next_token.stride(0), next_sibling.stride(0),
        uniform_accept.stride(0), accept_index.stride(0),
        BLOCK_N=max(16, next_pow2(N)), BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
    return accept_index, accept_len, bonus_token


# ----------------------------------------------------------------------------- shared host helpers
def _row_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_tree(candidates, next_token, next_sibling, op: str) -> tuple[int, int]:
    if candidates.dim() != 2:
        raise ValueError(f"{op} (triton): candidates must have shape [B, N], got {list(candidates.shape)}")
    B, N = candidates.shape
    if N < 1:
        raise ValueError(f"{op} (triton): candidates must hold at least the root node (N >= 1), got N = 0")
    for name, t in (("next_token", next_token), ("next_sibling", next_sibling)):
        if tuple(t.shape) != (B, N):
            raise ValueError(f"{op} (triton): {name} must have shape [{B}, {N}], got {list(t.shape)}")
    return B, N
