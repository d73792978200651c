"""Reference implementations of every sparrow op: plain PyTorch, written for clarity.

This module is the executable form of docs/ops.md; every backend (C++ CPU, CUDA, Triton)
is tested against it. It must stay simple and obviously correct: no speed tricks, no input
validation (call through `sparrow_kernels.ops` for checked inputs), no imports of kernels.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 accumulation for every input dtype, float64 kept for gradcheck."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _resolve_scale(scale: float, head_dim: int) -> float:
    return scale if scale > 0 else 1.0 / math.sqrt(head_dim)


# ----------------------------------------------------------------------------- window_attn
def window_visibility(kv_len: Tensor, q_pos: Tensor, Tk: int, window: int, n_anchor: int,
                      tree_mask: Tensor | None) -> Tensor:
    """The one definition of which key slot each query sees: bool `[B, Tq, Tk]`.

    Query i of row b at position p = q_pos[b, i] sees key slot j iff j < kv_len[b] and
    j <= p and (window <= 0 or j >= p - window + 1 or j < n_anchor). With a tree mask, the
    last Tq valid slots (kv_len[b] - Tq ..) are the query tokens and follow tree_mask only.
    """
    device = q_pos.device
    key_slot = torch.arange(Tk, device=device)                     # [Tk]
    pos = q_pos[:, :, None]                                       # [B, Tq, 1]
    valid = key_slot[None, None, :] < kv_len[:, None, None]       # [B, 1, Tk]
    causal = key_slot[None, None, :] <= pos                       # [B, Tq, Tk]
    if window > 0:
        in_window = (key_slot[None, None, :] >= pos - window + 1) | (key_slot[None, None, :] < n_anchor)
    else:
        in_window = torch.ones_like(causal)
    visible = valid & causal & in_window                          # [B, Tq, Tk]
    if tree_mask is not None:
        Tq = tree_mask.shape[1]
        tree_start = kv_len - Tq                                   # [B] first slot of the tree
        tree_node = key_slot[None, :] - tree_start[:, None]        # [B, Tk] node index of each slot
        in_tree = (tree_node >= 0) & (key_slot[None, :] < kv_len[:, None])   # [B, Tk]
        node_index = tree_node.clamp(0, Tq - 1)[:, None, :].expand(-1, Tq, -1)  # [B, Tq, Tk]
        tree_visible = torch.gather(tree_mask.to(torch.bool), 2, node_index)   # [B, Tq, Tk]
        visible = torch.where(in_tree[:, None, :], tree_visible, visible)
    return visible


def _expand_kv_heads(kv: Tensor, n_q_heads: int) -> Tensor:
    """[B, Hkv, Tk, D] -> [B, Hq, Tk, D]: query head h reads kv head h // (Hq // Hkv)."""
    return kv.repeat_interleave(n_q_heads // kv.shape[1], dim=1)


def _valid_slots(kv: Tensor, kv_len: Tensor, cdt: torch.dtype) -> Tensor:
    """kv [B, H, Tk, D] in the compute dtype with slots >= kv_len[b] set to 0: those slots
    are not keys (a preallocated cache may hold anything there, NaN included)."""
    slot = torch.arange(kv.shape[2], device=kv.device)
    invalid = slot[None, :] >= kv_len[:, None]                              # [B, Tk]
    return kv.to(cdt).masked_fill(invalid[:, None, :, None], 0)


def _masked_scores(q: Tensor, k: Tensor, kv_len: Tensor, q_pos: Tensor, window: int,
                   n_anchor: int, tree_mask: Tensor | None, scale: float):
    cdt = _compute_dtype(q)
    Hq, Tk, D = q.shape[1], k.shape[2], q.shape[3]
    scale = _resolve_scale(scale, D)
    keys = _expand_kv_heads(_valid_slots(k, kv_len, cdt), Hq)              # [B, Hq, Tk, D]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(cdt), keys) * scale       # [B, Hq, Tq, Tk]
    visible = window_visibility(kv_len, q_pos, Tk, window, n_anchor, tree_mask)[:, None]  # [B, 1, Tq, Tk]
    return scores.masked_fill(~visible, float("-inf")), visible, scale


def window_attn(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor, q_pos: Tensor, window: int,
                n_anchor: int, tree_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Text-anchored window attention. Returns out `[B, Hq, Tq, D]` (q's dtype) and
    lse `[B, Hq, Tq]` (float32; float64 for float64 inputs). Differentiable by autograd
    w.r.t. q, k, v. Queries with no visible key get out = 0, lse = -inf. A NaN in q or in a
    visible key gives NaN out and lse; a NaN value of a visible key gives NaN out there; keys
    a query cannot see never affect it."""
    cdt = _compute_dtype(q)
    scores, visible, _ = _masked_scores(q, k, kv_len, q_pos, window, n_anchor, tree_mask, scale)
    row_max = scores.amax(dim=-1, keepdim=True).detach()                    # [B, Hq, Tq, 1]
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)                                   # [B, Hq, Tq, Tk], 0 where masked
    denom = weights.sum(dim=-1, keepdim=True)                               # [B, Hq, Tq, 1]
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)
    values = _expand_kv_heads(_valid_slots(v, kv_len, cdt), q.shape[1])   # [B, Hq, Tk, D]
    out = _weighted_values(probs, values, visible)                          # [B, Hq, Tq, D]
    lse = (torch.log(denom) + row_max).squeeze(-1)                          # [B, Hq, Tq]
    return out.to(q.dtype), lse.to(cdt)


def _weighted_values(probs: Tensor, values: Tensor, visible: Tensor) -> Tensor:
    """probs @ values over each query's visible keys only: a plain matmul would spread a
    NaN/inf value of a key the query cannot see (probability 0; 0 * NaN = NaN). Finite values
    go through the matmul; a non-finite one reaches out[q, d] iff q sees its key, with IEEE
    sums: NaN wins, +inf and -inf together give NaN."""
    finite = torch.isfinite(values)                                         # [B, Hq, Tk, D]
    out = torch.einsum("bhqk,bhkd->bhqd", probs, values.masked_fill(~finite, 0))
    if bool(finite.all()):
        return out
    sees = visible.expand(-1, values.shape[1], -1, -1).to(values.dtype)    # [B, Hq, Tq, Tk]

    def seen(mask: Tensor) -> Tensor:                                       # [B, Hq, Tq, D] bool
        return torch.einsum("bhqk,bhkd->bhqd", sees, mask.to(values.dtype)) > 0

    pos_inf, neg_inf, nan = seen(values == math.inf), seen(values == -math.inf), seen(values.isnan())
    out = out.masked_fill(pos_inf, math.inf).masked_fill(neg_inf, -math.inf)
    return out.masked_fill(nan | (pos_inf & neg_inf), math.nan)


def window_attn_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         lse: Tensor, kv_len: Tensor, q_pos: Tensor, window: int, n_anchor: int,
                         tree_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of window_attn's `out` w.r.t. q, k, v by the explicit formulas
    (P = exp(S - lse), dS = P * (dO V^T - rowsum(dO * O))), recomputing P from lse as the
    fused kernels do. dk, dv are summed over the query heads of each GQA group."""
    cdt = _compute_dtype(q)
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scores, visible, scale = _masked_scores(q, k, kv_len, q_pos, window, n_anchor, tree_mask, scale)
    lse_c = lse.to(cdt)[..., None]                                          # [B, Hq, Tq, 1]
    lse_c = torch.where(torch.isinf(lse_c), torch.zeros_like(lse_c), lse_c)
    probs = torch.exp(scores - lse_c)                                       # [B, Hq, Tq, Tk], 0 where masked
    d_out = grad_out.to(cdt)
    keys = _expand_kv_heads(_valid_slots(k, kv_len, cdt), Hq)              # [B, Hq, Tk, D]
    values = _expand_kv_heads(_valid_slots(v, kv_len, cdt), Hq)            # [B, Hq, Tk, D]
    d_probs = torch.einsum("bhqd,bhkd->bhqk", d_out, values)                # [B, Hq, Tq, Tk]
    row_dot = (d_out * out.to(cdt)).sum(dim=-1, keepdim=True)               # [B, Hq, Tq, 1]
    d_scores = probs * (d_probs - row_dot) * scale                          # [B, Hq, Tq, Tk]
    dq = torch.einsum("bhqk,bhkd->bhqd", d_scores, keys)                    # [B, Hq, Tq, D]
    dk_per_q_head = torch.einsum("bhqk,bhqd->bhkd", d_scores, q.to(cdt))    # [B, Hq, Tk, D]
    dv_per_q_head = torch.einsum("bhqk,bhqd->bhkd", probs, d_out)           # [B, Hq, Tk, D]
    Tk = k.shape[2]
    dk = dk_per_q_head.view(B, Hkv, group, Tk, D).sum(dim=2)               # [B, Hkv, Tk, D]
    dv = dv_per_q_head.view(B, Hkv, group, Tk, D).sum(dim=2)               # [B, Hkv, Tk, D]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------- gather_hidden
def gather_hidden(hidden: list[Tensor], index: Tensor) -> Tensor:
    """out[b, n, l*H:(l+1)*H] = hidden[l][b, index[b, n]]; zeros where index == -1.
    hidden: n_layers x [B, T, H]; index [B, N] int64 -> out [B, N, n_layers * H]."""
    B, N = index.shape
    H = hidden[0].shape[-1]
    if hidden[0].shape[1] == 0:                                             # T = 0: every index is -1
        return hidden[0].new_zeros(B, N, len(hidden) * H)
    padding = index < 0                                                     # [B, N]
    safe_index = index.clamp(min=0)[:, :, None].expand(B, N, H)             # [B, N, H]
    per_layer = [torch.gather(h, 1, safe_index) for h in hidden]            # n_layers x [B, N, H]
    out = torch.cat(per_layer, dim=-1)                                      # [B, N, n_layers * H]
    return out.masked_fill(padding[:, :, None], 0)


# ----------------------------------------------------------------------------- tree verification
def _children(first_child: list[int], next_sibling: list[int], node: int):
    child = first_child[node]
    while child != -1:
        yield child
        child = next_sibling[child]


def _pack_paths(paths: list[list[int]], bonus: list[int], N: int, device) -> tuple[Tensor, Tensor, Tensor]:
    B = len(paths)
    accept_index = torch.full((B, N), -1, dtype=torch.int64)               # [B, N]
    for b, path in enumerate(paths):
        accept_index[b, : len(path)] = torch.tensor(path, dtype=torch.int64)
    accept_len = torch.tensor([len(p) for p in paths], dtype=torch.int64)  # [B]
    bonus_token = torch.tensor(bonus, dtype=torch.int64)                    # [B]
    return accept_index.to(device), accept_len.to(device), bonus_token.to(device)


def tree_verify_greedy(candidates: Tensor, target_predict: Tensor, next_token: Tensor,
                       next_sibling: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy tree acceptance: from the root, repeatedly accept the first child (in sibling
    order) whose token equals the target's argmax at the current node. Returns
    accept_index [B, N] (path from node 0, padded -1), accept_len [B], bonus_token [B]."""
    B, N = candidates.shape
    paths, bonus = [], []
    for b in range(B):
        tokens, predict = candidates[b].tolist(), target_predict[b].tolist()
        first_child, sibling = next_token[b].tolist(), next_sibling[b].tolist()
        cur, path = 0, [0]
        while True:
            match = next((c for c in _children(first_child, sibling, cur) if tokens[c] == predict[cur]), None)
            if match is None:
                break
            cur = match
            path.append(cur)
        paths.append(path)
        bonus.append(predict[cur])
    return _pack_paths(paths, bonus, N, candidates.device)


def _sample_residual(p: Tensor, S: Tensor, u: Tensor, b: int, node: int) -> int:
    """Inverse CDF of the unnormalised residual p: first t with cumsum(p)[t] > u * S, or
    the last t with p[t] > 0 if rounding runs past the end (none: an all-zero row raises, as
    the C++ kernel does)."""
    above = torch.nonzero(torch.cumsum(p, dim=0) > u * S)
    if above.numel() > 0:
        return int(above[0, 0])
    positive = torch.nonzero(p > 0)
    if positive.numel() == 0:
        raise ValueError(f"tree_verify_sample: target_probs[{b}, {node}] must have positive mass to sample the "
                         "bonus token, got an all-zero row")
    return int(positive[-1, 0])


def tree_verify_sample(candidates: Tensor, target_probs: Tensor, draft_probs: Tensor,
                       next_token: Tensor, next_sibling: Tensor, uniform_accept: Tensor,
                       uniform_final: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lossless stochastic tree acceptance (recursive rejection sampling when the draft
    probabilities are known, target-only rejection when draft_probs[b, i] sums to 0), with
    the caller's uniforms. All probability arithmetic in float32, in the order written in
    docs/ops.md. Returns accept_index [B, N], accept_len [B], bonus_token [B]."""
    B, N = candidates.shape
    paths, bonus = [], []
    for b in range(B):
        tokens = candidates[b].tolist()
        first_child, sibling = next_token[b].tolist(), next_sibling[b].tolist()
        target, draft = target_probs[b].float(), draft_probs[b].float()     # [N, V]
        u_accept = uniform_accept[b].float()                                # [N]
        cur, path = 0, [0]
        while True:
            p = target[cur].clone()                                         # [V] residual, unnormalised
            S = p.sum()
            q = draft[cur]
            Q = q.sum()
            accepted = None
            for c in _children(first_child, sibling, cur):
                x, u = tokens[c], u_accept[c]
                if Q > 0:
                    accept = bool(u * q[x] * S < p[x] * Q)
                else:
                    accept = bool(u * S < p[x])
                if accept:
                    accepted = c
                    break
                if Q > 0:
                    p = torch.clamp_min(p / S - q / Q, 0.0)
                else:
                    p[x] = 0.0
                S = p.sum()
                if S <= 0:                                                  # numerical guard
                    p = target[cur].clone()
                    S = p.sum()
            if accepted is None:
                bonus.append(_sample_residual(p, S, uniform_final[b].float(), b, cur))
                break
            cur = accepted
            path.append(cur)
        paths.append(path)
    return _pack_paths(paths, bonus, N, candidates.device)


# ----------------------------------------------------------------------------- kv_compact
def kv_compact(kv: Tensor, prefix_len: Tensor, accept_index: Tensor, accept_len: Tensor) -> None:
    """In place, for every row b and i < accept_len[b], in increasing i:
    kv[:, b, :, prefix_len[b] + i] = kv[:, b, :, prefix_len[b] + accept_index[b, i]].
    kv [L, B, H, S, D]. Slots below prefix_len[b] are never touched."""
    for b in range(kv.shape[1]):
        start = int(prefix_len[b])
        for i in range(int(accept_len[b])):
            src = start + int(accept_index[b, i])
            if src != start + i:
                kv[:, b, :, start + i] = kv[:, b, :, src]
