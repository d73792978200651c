"""Triton kernels for `window_attn`: fused forward (prefill, draft tree, split-KV decode) and
fused backward (dq, dk, dv), plus the autograd.Function that ties them together.

Semantics are docs/ops.md's (the reference in sparrow_kernels/ops/reference.py is the spec).
Input validation belongs to the ops front; this module only guards what would make a
kernel read out of bounds, and must not import the C++ extension.

Layout of the work: a program owns one KV head of one row and a tile of BLOCK_M "query
rows", where the rows of all GROUP = Hq / Hkv query heads sharing that KV head are packed
together (row r -> query r // GROUP, head offset r % GROUP), so every K/V byte is read once
per GQA group. A program visits only the key blocks of three segments: the anchor slots
[0, anchor_end), the window [lo, hi) spanned by its queries' positions, and (tree mode) the
Tq tree slots at the end of the row. Decode-like shapes split that block list over
NUM_SPLITS programs and merge the partial results by log-sum-exp (flash-decoding).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_pow2

LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLITS = 128


# ----------------------------------------------------------------------------- shared jit helpers
@triton.jit
def _query_rows(row_start, Tq, Tk, window, q_pos_row_ptr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of one tile: query index, head offset in the GQA group, validity, and each row's
    window rule over the key slots [0, Tk) as int32 bounds: slot j passes iff
    first <= j <= last (or j < n_anchor), with last = min(pos, Tk) and first =
    clamp(pos - window + 1, 0, Tk) (0 for window <= 0). They are formed from the int64
    position without overflow, so any q_pos and window value is exact. Also the smallest
    first and largest last among the valid rows."""
    rows = row_start + tl.arange(0, BLOCK_M)                       # [BLOCK_M]
    row_ok = rows < Tq * GROUP
    q_idx = rows // GROUP
    head_in_group = rows % GROUP
    pos = tl.maximum(tl.load(q_pos_row_ptr + q_idx, mask=row_ok, other=0).to(tl.int64), -1)  # [BLOCK_M]
    w1 = tl.maximum(window, 1).to(tl.int64)
    first = tl.where(window > 0, tl.minimum(tl.maximum(pos - w1 + 1, 0), Tk), 0).to(tl.int32)
    last = tl.minimum(pos, Tk).to(tl.int32)
    first_min = tl.min(tl.where(row_ok, first, 2147483647), axis=0)
    last_max = tl.max(tl.where(row_ok, last, -2147483647), axis=0)
    return q_idx, head_in_group, row_ok, first, last, first_min, last_max


@triton.jit
def _key_segments(first_min, last_max, kv_len, Tq, window, n_anchor,
                  HAS_TREE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks a tile with window bounds in [first_min, last_max] must visit, as three
    segments of whole blocks: anchors [0, anchor_end), window [lo, hi) (block-aligned start
    lo_aligned), tree slots [tree_lo, kv_len) (block-aligned start tree_aligned)."""
    if HAS_TREE:
        prefix_end = tl.maximum(kv_len - Tq, 0)
        tree_lo = prefix_end
        tree_aligned = (tree_lo // BLOCK_N) * BLOCK_N
        n_tree = tl.cdiv(kv_len - tree_aligned, BLOCK_N)
    else:
        prefix_end = kv_len
        tree_lo = kv_len
        tree_aligned = kv_len
        n_tree = kv_len * 0
    hi = tl.minimum(last_max + 1, prefix_end)
    if window > 0:
        lo = first_min
        anchor_end = tl.maximum(tl.minimum(tl.minimum(n_anchor, lo), hi), 0).to(tl.int32)  # i32 in both branches
    else:
        lo = first_min * 0
        anchor_end = first_min * 0
    lo_aligned = (lo // BLOCK_N) * BLOCK_N
    n_win = tl.where(hi > lo, tl.cdiv(hi - lo_aligned, BLOCK_N), 0)
    n_anchor_blocks = tl.cdiv(anchor_end, BLOCK_N)
    return (anchor_end, lo, lo_aligned, hi, tree_lo, tree_aligned,
            n_anchor_blocks, n_win, n_tree)


@triton.jit
def _block_keys(t, anchor_end, lo, lo_aligned, hi, tree_lo, tree_aligned, kv_len,
                n_anchor_blocks, n_win, BLOCK_N: tl.constexpr):
    """Key slots of the t-th visited block, whether each belongs to the block's segment, and
    whether the block is a tree block."""
    in_anchor = t < n_anchor_blocks
    in_window = (t >= n_anchor_blocks) & (t < n_anchor_blocks + n_win)
    start = tl.where(in_anchor, t * BLOCK_N,
                     tl.where(in_window, lo_aligned + (t - n_anchor_blocks) * BLOCK_N,
                              tree_aligned + (t - n_anchor_blocks - n_win) * BLOCK_N))
    seg_lo = tl.where(in_anchor, 0, tl.where(in_window, lo, tree_lo))
    seg_hi = tl.where(in_anchor, anchor_end, tl.where(in_window, hi, kv_len))
    keys = start + tl.arange(0, BLOCK_N)                           # [BLOCK_N]
    key_ok = (keys >= seg_lo) & (keys < seg_hi)
    is_tree = t >= n_anchor_blocks + n_win
    return keys, key_ok, is_tree


@triton.jit
def _visibility(keys, key_ok, is_tree, q_idx, row_ok, first, last, tree_row_ptr, stride_ti, tree_lo,
                n_anchor, HAS_TREE: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: which (query row, key) pairs of a block are visible."""
    k2 = keys[None, :]
    rule = (k2 <= last[:, None]) & ((k2 >= first[:, None]) | (k2 < n_anchor))
    base = row_ok[:, None] & key_ok[None, :]
    if HAS_TREE:
        tree_bits = tl.load(tree_row_ptr + q_idx[:, None] * stride_ti + (k2 - tree_lo),
                            mask=base & is_tree, other=0)
        vis = base & tl.where(is_tree, tree_bits != 0, rule)
    else:
        vis = base & rule
    return vis


# ----------------------------------------------------------------------------- forward
@triton.jit
def _window_attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, kv_len_ptr, q_pos_ptr, tree_ptr,
        out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_pb, stride_tb, stride_ti,
        B, Hkv, Tq, Tk, D, window, n_anchor, scale_log2,
        GROUP: tl.constexpr, HAS_TREE: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_split = tl.program_id(2)
    b = pid_bh // Hkv
    kv_head = pid_bh % Hkv
    b64 = b.to(tl.int64)
    Hq = Hkv * GROUP

    q_idx, head_in_group, row_ok, first, last, first_min, last_max = _query_rows(
        pid_m * BLOCK_M, Tq, Tk, window, q_pos_ptr + b64 * stride_pb, GROUP, BLOCK_M)
    head = kv_head * GROUP + head_in_group                         # [BLOCK_M]
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_tile_ptr = (q_ptr + b64 * stride_qb + head[:, None].to(tl.int64) * stride_qh
                  + q_idx[:, None].to(tl.int64) * stride_qt + d[None, :])
    q = tl.load(q_tile_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    kv_len = tl.minimum(tl.maximum(tl.load(kv_len_ptr + b), 0), Tk).to(tl.int32)
    (anchor_end, lo, lo_aligned, hi, tree_lo, tree_aligned,
     n_anchor_blocks, n_win, n_tree) = _key_segments(first_min, last_max, kv_len, Tq, window,
                                                     n_anchor, HAS_TREE, BLOCK_N)
    n_blocks = n_anchor_blocks + n_win + n_tree
    per_split = tl.cdiv(n_blocks, NUM_SPLITS)
    t_begin = pid_split * per_split
    t_end = tl.minimum(t_begin + per_split, n_blocks)

    k_base = k_ptr + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh
    tree_row_ptr = tree_ptr + b64 * stride_tb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)      # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                    # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)           # [BLOCK_M, BLOCK_D]
    v_nan = tl.zeros([BLOCK_M], dtype=tl.int32)                    # a visible key's v row is not finite
    for t in range(t_begin, t_end):
        keys, key_ok, is_tree = _block_keys(t, anchor_end, lo, lo_aligned, hi, tree_lo,
                                            tree_aligned, kv_len, n_anchor_blocks, n_win, BLOCK_N)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        vis = _visibility(keys, key_ok, is_tree, q_idx, row_ok, first, last, tree_row_ptr, stride_ti,
                          tree_lo, n_anchor, HAS_TREE)
        scores = tl.where(vis, scores, float("-inf"))
        # P @ V would spread 0 * NaN from a key some row of the tile cannot see: non-finite
        # values are zeroed there and the rows that see one are made NaN at the end
        v_bad = (v != v) | (tl.abs(v.to(tl.float32)) == float("inf"))                   # [BLOCK_N, BLOCK_D]
        key_bad = tl.max(v_bad.to(tl.int32), axis=1)                                    # [BLOCK_N]
        v_nan = tl.maximum(v_nan, tl.max((vis & (key_bad[None, :] > 0)).to(tl.int32), axis=1))
        v = tl.where(v_bad, 0.0, v)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        probs = tl.exp2(scores - m_safe[:, None])                  # 0 where not visible
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i != 0.0                                          # 0 only without a visible key; NaN stays NaN
    out_tile = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_tile = tl.where(v_nan[:, None] > 0, float("nan"), out_tile)
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    row_index = (b64 * Hq + head.to(tl.int64)) * Tq + q_idx        # flat (b, head, query) index
    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + row_index[:, None] * D + d[None, :], out_tile.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
        tl.store(lse_ptr + row_index, lse, mask=row_ok)
    else:
        n_rows = B * Hq * Tq
        part_row = pid_split.to(tl.int64) * n_rows + row_index
        tl.store(part_out_ptr + part_row[:, None] * D + d[None, :], out_tile, mask=out_mask)
        tl.store(part_lse_ptr + part_row, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, n_rows, D,
                         NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[row] = sum_s exp(lse_s - lse) * out_s, lse = logsumexp_s(lse_s), per (b, head, query)."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    part_row = s.to(tl.int64) * n_rows + row                      # [BLOCK_S]
    lse_s = tl.load(part_lse_ptr + part_row, mask=s_ok, other=float("-inf"))
    lse_max = tl.max(lse_s, axis=0)
    lse_safe = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp(lse_s - lse_safe)                              # [BLOCK_S], 0 for empty splits
    total = tl.sum(weight, axis=0)
    parts = tl.load(part_out_ptr + part_row[:, None] * D + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :] & (weight[:, None] > 0.0), other=0.0)
    has_keys = total != 0.0                                        # NaN (a NaN input) stays NaN
    merged = tl.sum(parts * weight[:, None], axis=0) / tl.where(has_keys, total, 1.0)
    lse = tl.where(has_keys, lse_safe + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
    tl.store(out_ptr + row * D + d, merged.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + row, lse)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _window_attn_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, kv_len_ptr, q_pos_ptr, tree_ptr, dq_ptr,
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_dob, stride_doh, stride_dot,
        stride_pb, stride_tb, stride_ti,
        Hkv, Tq, Tk, D, window, n_anchor, scale, scale_log2,
        GROUP: tl.constexpr, HAS_TREE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """dq for one tile of packed query rows: visits the same key blocks as the forward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    kv_head = pid_bh % Hkv
    b64 = b.to(tl.int64)
    Hq = Hkv * GROUP

    q_idx, head_in_group, row_ok, first, last, first_min, last_max = _query_rows(
        pid_m * BLOCK_M, Tq, Tk, window, q_pos_ptr + b64 * stride_pb, GROUP, BLOCK_M)
    head = kv_head * GROUP + head_in_group
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    tile_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b64 * stride_qb + head[:, None].to(tl.int64) * stride_qh
                + q_idx[:, None].to(tl.int64) * stride_qt + d[None, :], mask=tile_mask, other=0.0)
    d_out = tl.load(do_ptr + b64 * stride_dob + head[:, None].to(tl.int64) * stride_doh
                    + q_idx[:, None].to(tl.int64) * stride_dot + d[None, :], mask=tile_mask, other=0.0)
    row_index = (b64 * Hq + head.to(tl.int64)) * Tq + q_idx
    lse = tl.load(lse_ptr + row_index, mask=row_ok, other=0.0)
    lse_log2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + row_index, mask=row_ok, other=0.0)

    kv_len = tl.minimum(tl.maximum(tl.load(kv_len_ptr + b), 0), Tk).to(tl.int32)
    (anchor_end, lo, lo_aligned, hi, tree_lo, tree_aligned,
     n_anchor_blocks, n_win, n_tree) = _key_segments(first_min, last_max, kv_len, Tq, window,
                                                     n_anchor, HAS_TREE, BLOCK_N)
    k_base = k_ptr + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh
    tree_row_ptr = tree_ptr + b64 * stride_tb

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(0, n_anchor_blocks + n_win + n_tree):
        keys, key_ok, is_tree = _block_keys(t, anchor_end, lo, lo_aligned, hi, tree_lo,
                                            tree_aligned, kv_len, n_anchor_blocks, n_win, BLOCK_N)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        vis = _visibility(keys, key_ok, is_tree, q_idx, row_ok, first, last, tree_row_ptr, stride_ti,
                          tree_lo, n_anchor, HAS_TREE)
        probs = tl.where(vis, tl.exp2(scores - lse_log2[:, None]), 0.0)       # [BLOCK_M, BLOCK_N]
        d_probs = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION)
        d_scores = probs * (d_probs - delta[:, None])
        dq += tl.dot(d_scores.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq = dq * scale
    tl.store(dq_ptr + row_index[:, None] * D + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _window_attn_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, kv_len_ptr, q_pos_ptr, tree_ptr,
        dk_ptr, dv_ptr,
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_dob, stride_doh, stride_dot,
        stride_pb, stride_tb, stride_ti,
        Hkv, Tq, Tk, D, window, n_anchor, scale, scale_log2,
        GROUP: tl.constexpr, HAS_TREE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """dk, dv for one block of keys of one KV head, summed over every query row of the GQA
    group; query tiles that cannot see the block are skipped by their position range."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    kv_head = pid_bh % Hkv
    b64 = b.to(tl.int64)
    Hq = Hkv * GROUP

    kv_len = tl.minimum(tl.maximum(tl.load(kv_len_ptr + b), 0), Tk).to(tl.int32)
    if HAS_TREE:
        prefix_end = tl.maximum(kv_len - Tq, 0)
    else:
        prefix_end = kv_len
    tree_lo = prefix_end
    key_start = pid_n * BLOCK_N
    keys = key_start + tl.arange(0, BLOCK_N)                       # [BLOCK_N]
    key_ok = keys < kv_len
    is_tree_key = keys >= tree_lo                                  # only meaningful with a tree
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh
                + keys[:, None].to(tl.int64) * stride_kt + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh
                + keys[:, None].to(tl.int64) * stride_vt + d[None, :], mask=kv_mask, other=0.0)
    q_pos_row_ptr = q_pos_ptr + b64 * stride_pb
    tree_row_ptr = tree_ptr + b64 * stride_tb
    key_last = key_start + BLOCK_N - 1
    if HAS_TREE:
        block_has_tree = (key_last >= tree_lo) & (key_start < kv_len)
    else:
        block_has_tree = key_start < 0
    block_has_prefix = key_start < prefix_end

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    n_row_tiles = tl.cdiv(Tq * GROUP, BLOCK_M)
    for m_tile in range(0, n_row_tiles):
        q_idx, head_in_group, row_ok, first, last, first_min, last_max = _query_rows(
            m_tile * BLOCK_M, Tq, Tk, window, q_pos_row_ptr, GROUP, BLOCK_M)
        sees_prefix = block_has_prefix & (last_max >= key_start) & (
            (key_start < n_anchor) | (first_min <= key_last))
        if sees_prefix | block_has_tree:
            head = kv_head * GROUP + head_in_group
            tile_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b64 * stride_qb + head[:, None].to(tl.int64) * stride_qh
                        + q_idx[:, None].to(tl.int64) * stride_qt + d[None, :], mask=tile_mask, other=0.0)
            d_out = tl.load(do_ptr + b64 * stride_dob + head[:, None].to(tl.int64) * stride_doh
                            + q_idx[:, None].to(tl.int64) * stride_dot + d[None, :], mask=tile_mask,
                            other=0.0)
            row_index = (b64 * Hq + head.to(tl.int64)) * Tq + q_idx
            lse = tl.load(lse_ptr + row_index, mask=row_ok, other=0.0)
            lse_log2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
            delta = tl.load(delta_ptr + row_index, mask=row_ok, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
            k2 = keys[None, :]
            rule = ((k2 <= last[:, None]) & ((k2 >= first[:, None]) | (k2 < n_anchor))
                    & (k2 < prefix_end))
            base = row_ok[:, None] & key_ok[None, :]
            if HAS_TREE:
                tree_bits = tl.load(tree_row_ptr + q_idx[:, None] * stride_ti + (k2 - tree_lo),
                                    mask=base & is_tree_key[None, :], other=0)
                vis = base & tl.where(is_tree_key[None, :], tree_bits != 0, rule)
            else:
                vis = base & rule
            probs = tl.where(vis, tl.exp2(scores - lse_log2[:, None]), 0.0)
            dv += tl.dot(tl.trans(probs.to(d_out.dtype)), d_out, input_precision=DOT_PRECISION)
            d_probs = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION)
            d_scores = probs * (d_probs - delta[:, None])
            dk += tl.dot(tl.trans(d_scores.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = dk * scale
    out_rows = (b64 * Hkv + kv_head) * Tk + keys.to(tl.int64)     # flat (b, kv head, key) index
    out_mask = (keys < Tk)[:, None] & d_ok[None, :]
    tl.store(dk_ptr + out_rows[:, None] * D + d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + out_rows[:, None] * D + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------- host side
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use tf32 only when the caller allows it (torch.backends.cuda.matmul)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_d(D: int) -> int:
    return max(16, next_pow2(D))


@functools.lru_cache(maxsize=None)
def _forward_config(n_rows: int, block_d: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward: small packed tiles for
    decode/trees; tiles of wide rows (fp32, D = 256) kept small so the pipelined K/V stages
    fit in shared memory (<= ~100 KB)."""
    wide = block_d * elem_bytes                                    # bytes of one key row
    block_m = min(64 if wide <= 512 else 32, max(16, next_pow2(n_rows)))
    block_n = max(16, min(64, 16384 // wide))
    num_warps = 4 if (block_m <= 16 or wide <= 256) else 8
    return block_m, block_n, num_warps, 3 if wide <= 256 else 2


def default_num_splits(B: int, Hkv: int, n_row_tiles: int, max_visited_keys: int, block_n: int,
                       device: torch.device) -> int:
    """Split-KV factor: enough programs for ~2 waves over the SMs, each split keeping at least
    2 key blocks. 1 on the CPU (interpreter) and when the grid already fills the device."""
    if device.type != "cuda":
        return 1
    programs = B * Hkv * n_row_tiles
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    max_blocks = cdiv(max(max_visited_keys, 1), block_n)
    splits = min(cdiv(2 * sms, programs), cdiv(max_blocks, 2), _MAX_SPLITS)
    return max(1, splits)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(q, k, v, kv_len, q_pos, tree_mask) -> None:
    """Guards against what would make a kernel read out of bounds (the ops front does the
    full validation with the contract's messages)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"window_attn (triton): q, k, v must be 4-D [B, H, T, D], got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"window_attn (triton): k, v must have shape [B, Hkv, Tk, D] = "
                         f"[{B}, ?, ?, {D}], got {list(k.shape)} and {list(v.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"window_attn (triton): Hq = {Hq} must be a multiple of Hkv = {k.shape[1]}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"window_attn: backend 'triton' computes float32/float16/bfloat16 (float64 runs on "
                         f"'reference', 'cpu' and 'cuda'); q, k, v must share one of them, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        # the interpreter computes bf16 dots wrongly (lse ~4e9 for a 4-key row): refuse
        raise ValueError("window_attn: backend 'triton' cannot compute bfloat16 in the Triton interpreter "
                         "(TRITON_INTERPRET=1, CPU tensors); use a GPU, float16/float32, or backend 'cpu'")
    if D > 256:
        raise ValueError(f"window_attn (triton): head dim D must be <= 256, got {D}")
    if tuple(kv_len.shape) != (B,) or tuple(q_pos.shape) != (B, Tq):
        raise ValueError(f"window_attn (triton): kv_len must have shape [{B}] and q_pos [{B}, {Tq}], "
                         f"got {list(kv_len.shape)} and {list(q_pos.shape)}")
    if tree_mask is not None and tuple(tree_mask.shape) != (B, Tq, Tq):
        raise ValueError(f"window_attn (triton): tree_mask must have shape [B, Tq, Tq] = "
                         f"[{B}, {Tq}, {Tq}], got {list(tree_mask.shape)}")
    device = q.device
    if not (k.device == v.device == kv_len.device == q_pos.device == device) or (
            tree_mask is not None and tree_mask.device != device):
        raise ValueError(f"window_attn (triton): all tensors must be on q's device {device}")


def _anchor_slots(n_anchor: int, Tk: int) -> int:
    """n_anchor clamped to [0, Tk]: the same visibility over slots [0, Tk), in int32 range."""
    return min(max(int(n_anchor), 0), Tk)


def _common(q, k, v, kv_len, q_pos, tree_mask, scale):
    """Layout preparation shared by forward and backward."""
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    q_pos, kv_len = _last_dim_contiguous(q_pos), kv_len.contiguous()
    if tree_mask is not None:
        tree_u8 = _last_dim_contiguous(tree_mask.to(torch.bool)).view(torch.uint8)  # [B, Tq, Tq]
        tree_strides = (tree_u8.stride(0), tree_u8.stride(1))
    else:
        tree_u8 = q_pos                                            # never read
        tree_strides = (0, 0)
    D = q.shape[-1]
    scale = scale if scale > 0 else 1.0 / math.sqrt(D)
    return q, k, v, kv_len, q_pos, tree_u8, tree_strides, scale


def window_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                        q_pos: torch.Tensor, window: int, n_anchor: int,
                        tree_mask: torch.Tensor | None, scale: float, *,
                        num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward. Returns out [B, Hq, Tq, D] (q's dtype) and lse [B, Hq, Tq] (float32).
    `num_splits` overrides the split-KV factor (benchmarks, tests); None picks it."""
    _check_inputs(q, k, v, kv_len, q_pos, tree_mask)
    q, k, v, kv_len, q_pos, tree_u8, (stride_tb, stride_ti), scale = _common(q, k, v, kv_len, q_pos, tree_mask, scale)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)       # [B, Hq, Tq, D]
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)    # [B, Hq, Tq]
    if B == 0 or Tq == 0 or Hq == 0:
        return out, lse
    if Tk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    block_d = _block_d(D)
    n_rows = Tq * group
    block_m, block_n, num_warps, num_stages = _forward_config(n_rows, block_d, q.element_size())
    n_row_tiles = cdiv(n_rows, block_m)
    if num_splits is None:
        visited = Tk if window <= 0 else min(Tk, window + max(n_anchor, 0) + n_rows // group)
        num_splits = default_num_splits(B, Hkv, n_row_tiles, visited, block_n, q.device)
    num_splits = int(max(1, min(num_splits, _MAX_SPLITS)))
    if num_splits > 1:
        part_out = torch.empty((num_splits, B, Hq, Tq, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_splits, B, Hq, Tq), dtype=torch.float32, device=q.device)
    else:
        part_out, part_lse = out, lse                              # never written
    grid = (n_row_tiles, B * Hkv, num_splits)
    _window_attn_fwd_kernel[grid](
        q, k, v, kv_len, q_pos, tree_u8, out, lse, part_out, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        q_pos.stride(0), stride_tb, stride_ti,
        B, Hkv, Tq, Tk, D, int(window), _anchor_slots(n_anchor, Tk), scale * LOG2E,
        GROUP=group, HAS_TREE=tree_mask is not None, NUM_SPLITS=num_splits,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        n_out_rows = B * Hq * Tq
        _merge_splits_kernel[(n_out_rows,)](
            part_out, part_lse, out, lse, n_out_rows, D,
            NUM_SPLITS=num_splits, BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d,
            num_warps=4)
    return out, lse


@functools.lru_cache(maxsize=None)
def _backward_config(block_d: int, elem_bytes: int) -> tuple[int, int, int, int, int, int]:
    """(dq BLOCK_M, dq BLOCK_N, dkdv BLOCK_M, dkdv BLOCK_N, num_warps, num_stages)."""
    wide = block_d * elem_bytes                                    # bytes of one row
    if wide <= 256:
        return 64, 64, 64, 64, 4, 2
    if wide <= 512:
        return 64, 32, 32, 64, 4, 2
    return 32, 32, 16, 32, 8, 1


def window_attn_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, kv_len: torch.Tensor,
                         q_pos: torch.Tensor, window: int, n_anchor: int,
                         tree_mask: torch.Tensor | None, scale: float, *,
                         grad_lse: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: dq [B, Hq, Tq, D], dk, dv [B, Hkv, Tk, D] (summed over the query heads
    of each GQA group, zero for never-visible keys). `grad_lse` (optional, [B, Hq, Tq]) adds
    the gradient flowing into lse: d lse / d score = P, so it folds into delta."""
    _check_inputs(q, k, v, kv_len, q_pos, tree_mask)
    q, k, v, kv_len, q_pos, tree_u8, (stride_tb, stride_ti), scale = _common(q, k, v, kv_len, q_pos, tree_mask, scale)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    d_out = _last_dim_contiguous(grad_out.to(q.dtype))
    delta = (d_out.float() * out.float()).sum(dim=-1)              # [B, Hq, Tq] rowsum(dO * O)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    dq = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)        # [B, Hq, Tq, D]
    dk = torch.empty((B, Hkv, Tk, D), dtype=k.dtype, device=q.device)       # [B, Hkv, Tk, D]
    dv = torch.empty((B, Hkv, Tk, D), dtype=v.dtype, device=q.device)       # [B, Hkv, Tk, D]
    if B == 0 or Hq == 0 or Tk == 0 or Tq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _block_d(D)
    dq_m, dq_n, kv_m, kv_n, num_warps, num_stages = _backward_config(block_d, q.element_size())
    precision = _dot_precision(q.dtype)
    n_rows = Tq * group
    common_strides = (q.stride(0), q.stride(1), q.stride(2),
                      k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2),
                      d_out.stride(0), d_out.stride(1), d_out.stride(2),
                      q_pos.stride(0), stride_tb, stride_ti)
    scalars = (Hkv, Tq, Tk, D, int(window), _anchor_slots(n_anchor, Tk), scale, scale * LOG2E)
    _window_attn_bwd_dq_kernel[(cdiv(n_rows, dq_m), B * Hkv)](
        q, k, v, d_out, lse, delta, kv_len, q_pos, tree_u8, dq, *common_strides, *scalars,
        GROUP=group, HAS_TREE=tree_mask is not None, BLOCK_M=dq_m, BLOCK_N=dq_n,
        BLOCK_D=block_d, DOT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    _window_attn_bwd_dkdv_kernel[(cdiv(Tk, kv_n), B * Hkv)](
        q, k, v, d_out, lse, delta, kv_len, q_pos, tree_u8, dk, dv, *common_strides, *scalars,
        GROUP=group, HAS_TREE=tree_mask is not None, BLOCK_M=kv_m, BLOCK_N=kv_n,
        BLOCK_D=block_d, DOT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv


class WindowAttnFunction(torch.autograd.Function):
    """Differentiable window_attn on the Triton kernels (gradients w.r.t. q, k, v; the
    gradient reaching lse is honoured too)."""

    @staticmethod
    def forward(ctx, q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale, num_splits):
        out, lse = window_attn_forward(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale,
                                       num_splits=num_splits)
        ctx.save_for_backward(q, k, v, out, lse, kv_len, q_pos, tree_mask)
        ctx.window, ctx.n_anchor, ctx.scale = window, n_anchor, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, kv_len, q_pos, tree_mask = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = window_attn_backward(grad_out, q, k, v, out, lse, kv_len, q_pos, ctx.window,
                                          ctx.n_anchor, tree_mask, ctx.scale, grad_lse=grad_lse)
        return dq, dk, dv, None, None, None, None, None, None, None


def window_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                q_pos: torch.Tensor, window: int, n_anchor: int, tree_mask: torch.Tensor | None,
                scale: float, *, num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/ops.md's window_attn on Triton; differentiable w.r.t. q, k, v when autograd needs it."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return WindowAttnFunction.apply(q, k, v, kv_len, q_pos, int(window), int(n_anchor),
                                        tree_mask, float(scale), num_splits)
    return window_attn_forward(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask, scale,
                               num_splits=num_splits)
