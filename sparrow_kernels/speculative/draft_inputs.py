"""Which target state feeds which draft entry (the EAGLE shift), shared by training
(training/train_draft.py) and inference (engine.py) so the two cannot drift apart. Entry e of a
row pairs the target feature at the row's e-th kept position with the token at its next kept
position (t + 1 whenever the kept positions are contiguous). Index arithmetic on `[B, P]`
tensors only: it must not run a model or gather features itself.
"""
from __future__ import annotations

import torch
from torch import Tensor


def kept_mask(text_mask: Tensor, lengths: Tensor, visual_kv: bool) -> Tensor:
    """The positions a draft sees, `[B, T]` bool: Sparrow / VATA (visual_kv=False) keeps the
    text positions, the visual-KV baseline every position; both always keep each row's last
    position (the one the next token follows). text_mask `[B, T]` bool, lengths `[B]`."""
    position = torch.arange(text_mask.shape[1], device=text_mask.device)
    in_row = position[None, :] < lengths[:, None]                                          # [B, T]
    keep = in_row if visual_kv else (in_row & text_mask)
    return keep | (position[None, :] == (lengths - 1)[:, None])


def kept_positions(keep: Tensor) -> tuple[Tensor, Tensor]:
    """The kept positions of `keep [B, T]` in order, left-aligned: order `[B, P]` (-1 padding)
    and count `[B]`."""
    count = keep.sum(dim=1)                                                                # [B]
    P = int(count.max()) if count.numel() else 0
    first = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :P]         # [B, P]
    real = torch.arange(P, device=keep.device)[None, :] < count[:, None]
    return torch.where(real, first, -1), count


def shift_pairs(order: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """The EAGLE shift over a row's kept positions `order [B, P]` (-1 padding), `count [B]`:
    entry_pos `[B, P]` = order (the target feature of entry e) and token_pos `[B, P]` = the
    next kept position (the token of entry e). The last entry's token lies after the sequence:
    its token_pos is -1 (inference supplies the next generated token, `open_entries`; training
    has no label for it and drops the entry). Padding is -1 in both."""
    P = order.shape[1]
    slot = torch.arange(P, device=order.device)[None, :]
    entry_pos = torch.where(slot < count[:, None], order, -1)                              # [B, P]
    after = torch.cat([order[:, 1:], order.new_full((order.shape[0], 1), -1)], dim=1)      # [B, P]
    token_pos = torch.where(slot < (count - 1)[:, None], after, -1)                        # [B, P]
    return entry_pos, token_pos


def open_entries(order: Tensor, count: Tensor, sequence_tokens: Tensor, next_token: Tensor) -> tuple[Tensor, Tensor]:
    """Inference: all `count[b]` entries of the kept positions `order [B, P]` of a sequence
    whose continuation is not yet seen by the draft. Entry e's token is `sequence_tokens [B, T]`
    at the next kept position; the last entry's is `next_token [B]` (the token just chosen).
    Returns entry_pos `[B, P]` (-1 padding) and tokens `[B, P]` (0 at padding)."""
    entry_pos, token_pos = shift_pairs(order, count)
    tokens = sequence_tokens.gather(1, token_pos.clamp(min=0))                             # [B, P]
    tokens = tokens.scatter(1, (count - 1).clamp(min=0)[:, None], next_token[:, None].to(tokens.dtype))
    return entry_pos, torch.where(entry_pos >= 0, tokens, 0)


__all__ = ["kept_mask", "kept_positions", "open_entries", "shift_pairs"]
