"""Shared pieces of the engine tests: small random targets (tiny VLM, tiny HF models), random
video prompts, and test-only drafts that implement docs/draft_api.md: an oracle that knows
the target's greedy continuation, and a recorder around any draft. No test functions here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from sparrow_kernels.speculative.draft import DraftConfig, SparrowDraft
from sparrow_kernels.targets.base import VideoPrompt
from sparrow_kernels.targets.tinyvlm import TinyVLM, TinyVLMConfig, TinyVLMTarget

FIRST_TEXT_ID = 4            # tiny VLM ids 0..3 are pad, bos, eos, video


def tiny_vlm(seed: int = 0, vocab_size: int = 64, init_std: float = 0.25, num_layers: int = 2,
             hidden_size: int = 32, num_heads: int = 2, num_kv_heads: int = 1) -> TinyVLMTarget:
    """A random tiny VLM (4 visual tokens per 16x16 frame). The weights are drawn wider than
    the training init (std 0.02) so that greedy outputs vary instead of repeating one token."""
    torch.manual_seed(seed)
    cfg = TinyVLMConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                        num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads, intermediate_size=2 * hidden_size,
                        frame_size=16, patch_size=8)
    model = TinyVLM(cfg)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=init_std)
    return TinyVLMTarget(model)


def vlm_prompts(target: TinyVLMTarget, count: int, seed: int, frames=(1, 4), text=(2, 9)) -> list[VideoPrompt]:
    """Random videos (uint8 [T, 16, 16, 3]) with random text ids; different lengths per row."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        n_frames = int(torch.randint(frames[0], frames[1] + 1, (1,), generator=gen))
        n_text = int(torch.randint(text[0], text[1] + 1, (1,), generator=gen))
        video = torch.randint(0, 256, (n_frames, 16, 16, 3), dtype=torch.uint8, generator=gen)
        ids = torch.randint(FIRST_TEXT_ID, target.vocab_size, (n_text,), generator=gen)
        prompts.append(VideoPrompt(frames=video, prompt_ids=ids))
    return prompts


def prompt_length(target: TinyVLMTarget, prompt: VideoPrompt) -> int:
    return target.visual_tokens_for(prompt.frames.shape[0]) + len(prompt.prompt_ids)


def random_draft(target, seed: int = 0, feature_layers=None, visual_kv: bool = False, window: int = 0,
                 n_anchor: int = 0) -> SparrowDraft:
    """The real Sparrow draft with random weights (acceptance near zero)."""
    torch.manual_seed(seed)
    H = target.hidden_size
    heads = 2
    config = DraftConfig(hidden_size=H, num_heads=heads, num_kv_heads=1, head_dim=H // heads,
                         intermediate_size=2 * H, vocab_size=target.vocab_size,
                         feature_layers=tuple(feature_layers or (target.num_layers,)), window=window,
                         n_anchor=n_anchor, visual_kv=visual_kv)
    return SparrowDraft.from_target(config, target).eval()


class CharTokenizer:
    """Detokenizer for stop-string tests: id i decodes to '<i>', so '<i>' occurs in a text
    exactly where token i does."""

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids)


# ----------------------------------------------------------------------------- oracle draft
@dataclass
class OracleCache:
    lengths: Tensor                        # [B] committed entries (unused by the engine, kept for the API)
    seen: list[int]                        # generated tokens seen per row
    on_track: list[bool]                   # everything seen so far equals the continuation
    scratch_len: int = 0
    calls: list = field(default_factory=list)


class OracleDraft:
    """A draft that knows each row's greedy continuation `continuations[b]` (from plain
    decoding) and proposes it: the logit of the true next token is `margin` above a fixed
    random pattern, as long as everything drafted on that branch was right. Every
    `second_every`-th position (if set) a decoy token gets the top logit and the true token
    comes second, so only trees with top_k >= 2 find it (on a non-first sibling).

    Its hidden state is bookkeeping, not a neural state: [.., 0] the index of the next
    continuation token, [.., 1] on-track flag, [.., 2] the row. It also checks the shapes
    the engine passes (features [B, T, F], tree masks [B, K, M] that grow by K per step)."""

    HIDDEN = 3

    def __init__(self, continuations: list[list[int]], vocab_size: int, feature_size: int,
                 feature_layers: tuple[int, ...], margin: float = 8.0, second_every: int | None = None,
                 visual_kv: bool = False, seed: int = 0):
        self.continuations = continuations
        self.config = SimpleNamespace(feature_layers=feature_layers, visual_kv=visual_kv, vocab_size=vocab_size)
        self.feature_size = feature_size
        self.margin = margin
        self.second_every = second_every
        self.pattern = torch.randn(17, vocab_size, generator=torch.Generator().manual_seed(seed))   # [17, V]

    def new_cache(self, batch_size: int, capacity: int) -> OracleCache:
        return OracleCache(lengths=torch.zeros(batch_size, dtype=torch.int64), seen=[0] * batch_size,
                           on_track=[True] * batch_size)

    def reset_scratch(self, cache: OracleCache) -> None:
        cache.scratch_len = 0

    def _hidden(self, pos: Tensor, on_track: Tensor, row: Tensor) -> Tensor:
        return torch.stack([pos.float(), on_track.float(), row.float()], dim=-1)

    def extend(self, cache: OracleCache, tokens: Tensor, features: Tensor, valid: Tensor) -> Tensor:
        B, T = tokens.shape
        assert features.shape == (B, T, self.feature_size), features.shape
        assert valid.dtype == torch.int64 and valid.shape == (B,)
        first_call = bool((cache.lengths == 0).all())
        pos = torch.zeros(B, T, dtype=torch.int64)
        for b in range(B):
            n = int(valid[b])
            generated = tokens[b, n - 1:n].tolist() if first_call else tokens[b, :n].tolist()
            start = cache.seen[b]
            truth = self.continuations[b][start:start + len(generated)]
            cache.on_track[b] = cache.on_track[b] and generated == truth
            cache.seen[b] = start + len(generated)
            pos[b] = cache.seen[b] - (n - 1 - torch.arange(T)).clamp(min=0)
        cache.lengths = cache.lengths + valid.cpu()
        cache.scratch_len = 0
        on_track = torch.tensor(cache.on_track)[:, None].expand(B, T)
        rows = torch.arange(B)[:, None].expand(B, T)
        return self._hidden(pos, on_track, rows).to(tokens.device)

    def draft_step(self, cache: OracleCache, tokens: Tensor, prev_hidden: Tensor, depth: Tensor,
                   tree_mask: Tensor) -> Tensor:
        B, K = tokens.shape
        cache.scratch_len += K
        assert tree_mask.shape == (B, K, cache.scratch_len), (tree_mask.shape, cache.scratch_len)
        assert bool(tree_mask[:, :, -K:].diagonal(dim1=1, dim2=2).all())
        pos = prev_hidden[..., 0].long()
        on_track = prev_hidden[..., 1] > 0
        rows = prev_hidden[..., 2].long()
        truth = torch.tensor([[self._truth(int(r), int(p)) for r, p in zip(rr, pp)]
                              for rr, pp in zip(rows.tolist(), pos.tolist())])
        return self._hidden(pos + 1, on_track & (tokens.cpu() == truth), rows).to(tokens.device)

    def _truth(self, row: int, pos: int) -> int:
        cont = self.continuations[row]
        return cont[pos] if 0 <= pos < len(cont) else -1

    def logits(self, hidden: Tensor) -> Tensor:
        flat = hidden.reshape(-1, self.HIDDEN).cpu()
        out = self.pattern[flat[:, 0].long() % 17].clone()                          # [n, V]
        for i, (pos, on_track, row) in enumerate(flat.tolist()):
            truth = self._truth(int(row), int(pos))
            if on_track > 0 and truth >= 0:
                out[i, truth] = out[i].max() + self.margin
                if self.second_every and int(pos) % self.second_every == 0:
                    decoy = (truth + 1) % out.shape[1]
                    out[i, decoy] = out[i, truth] + 1.0
        return out.reshape(*hidden.shape[:-1], -1).to(hidden.device)


def oracle_for(target, prompts, max_new_tokens: int, eos_token_ids=(), **kwargs) -> OracleDraft:
    """An OracleDraft whose continuations are the target's plain greedy outputs."""
    from sparrow_kernels.speculative.engine import autoregressive_generate

    plain = autoregressive_generate(target, prompts, max_new_tokens + 8, eos_token_ids=list(eos_token_ids),
                                    capacity=max(prompt_length_any(target, p) for p in prompts) + max_new_tokens + 16)
    return OracleDraft(plain.tokens, target.vocab_size, target.hidden_size, (target.num_layers,), **kwargs)


def prompt_length_any(target, prompt: VideoPrompt) -> int:
    if isinstance(target, TinyVLMTarget):
        return prompt_length(target, prompt)
    return int(target._row_inputs(prompt, 0).input_ids.shape[1])


# ----------------------------------------------------------------------------- recorder
class RecordingDraft:
    """Wraps a draft and keeps a copy of every extend call (tokens, features, valid) and of
    every draft_step call's inputs, delegating everything to the wrapped draft."""

    def __init__(self, inner):
        self.inner = inner
        self.config = inner.config
        self.extends: list[tuple[Tensor, Tensor, Tensor]] = []
        self.steps: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def extend(self, cache, tokens, features, valid):
        self.extends.append((tokens.clone(), features.clone(), valid.clone()))
        return self.inner.extend(cache, tokens, features, valid)

    def draft_step(self, cache, tokens, prev_hidden, depth, tree_mask):
        hidden = self.inner.draft_step(cache, tokens, prev_hidden, depth, tree_mask)
        self.steps.append(dict(tokens=tokens.clone(), prev_hidden=prev_hidden.clone(), depth=depth.clone(),
                               tree_mask=tree_mask.clone(), hidden=hidden.clone()))
        return hidden


class CountingTarget:
    """Wraps a target and counts forward_tree / commit calls (to prove nothing ran)."""

    def __init__(self, inner):
        self.inner = inner
        self.forward_calls = 0
        self.commit_calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward_tree(self, *args, **kwargs):
        self.forward_calls += 1
        return self.inner.forward_tree(*args, **kwargs)

    def commit(self, *args, **kwargs):
        self.commit_calls += 1
        return self.inner.commit(*args, **kwargs)
