"""The Sparrow draft model: an EAGLE-style one-layer head over the target's hidden states
whose self-attention is `sparrow_kernels.ops.window_attn` over the draft's own cache
(text positions only for Sparrow/VATA; every position for the visual-KV baseline).
It reuses the target's frozen embedding and final norm + LM head and never stores them;
it does not choose which positions it sees (the engine / trainer gathers the features).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import ops
from ..ops.checks import check_tensor
from ..targets.committed import CHECKPOINTS, WORLD_TARGET

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DraftConfig:
    """Shape and behaviour of a draft head; saved as config.json next to model.safetensors."""

    hidden_size: int                  # = target hidden size H (embedding and LM head are the target's)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    feature_layers: tuple[int, ...]   # target layers fused into the draft input, e.g. (L,) or (2, L//2, L-3)
    window: int = 0                   # text-anchored window (keys incl. the query); <= 0 unlimited
    n_anchor: int = 0                 # first n_anchor draft-cache slots always visible
    visual_kv: bool = False           # True: visual positions enter the draft cache (EAGLE/MSD baseline)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # Target layer whose states feed the *visual* entries when visual_kv is True (IVSB
    # without VATA). None: the visual entries use `feature_layers` like the text ones.
    visual_feature_layer: int | None = None
    # The draft vocabulary (EAGLE-3's draft-to-target map): 0 = the target's whole vocabulary;
    # K > 0 = the draft proposes only the K target ids in its `draft_vocab` buffer (sorted,
    # saved in model.safetensors), so each tree level computes K logits instead of V.
    draft_vocab_size: int = 0

    def __post_init__(self) -> None:
        self.feature_layers = tuple(int(x) for x in self.feature_layers)
        if not self.feature_layers:
            raise ValueError("DraftConfig: feature_layers must name at least one target layer")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"DraftConfig: num_heads={self.num_heads} must be a positive multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2 != 0 or self.head_dim > 256:
            raise ValueError(f"DraftConfig: head_dim must be even and <= 256, got {self.head_dim}")
        if self.n_anchor < 0:
            raise ValueError(f"DraftConfig: n_anchor must be >= 0, got {self.n_anchor}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"DraftConfig: draft_vocab_size must be 0 (the whole vocabulary) or in [1, "
                             f"vocab_size={self.vocab_size}], got {self.draft_vocab_size}")

    @property
    def feature_size(self) -> int:
        """F: width of the target features the draft consumes (len(feature_layers) * H)."""
        return len(self.feature_layers) * self.hidden_size

    @property
    def target_layers(self) -> tuple[int, ...]:
        """Every target layer the engine must request at prefill / tree verification."""
        extra = () if self.visual_feature_layer is None or not self.visual_kv else (self.visual_feature_layer,)
        return tuple(dict.fromkeys(self.feature_layers + extra))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["feature_layers"] = list(self.feature_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DraftConfig":
        """A config read from JSON: every key known, the required ones present, each value of
        its field's type (ValueError naming the key otherwise)."""
        if not isinstance(d, dict):
            raise ValueError(f"DraftConfig: expected a JSON object, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        unknown = sorted(set(d) - {f.name for f in fields})
        if unknown:
            raise ValueError(f"DraftConfig: unknown config keys {unknown}")
        missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"DraftConfig: missing config keys {missing}")
        for f in fields:
            if f.name in d and not _is_of_type(d[f.name], f.type):
                expected = {"int": "an int", "float": "a number", "bool": "true or false", "tuple[int, ...]": "a list of ints",
                            "int | None": "an int or null"}.get(f.type, f.type)
                raise ValueError(f"DraftConfig: {f.name} must be {expected}, got {type(d[f.name]).__name__} "
                                 f"{d[f.name]!r}")
        return cls(**d)


def _is_of_type(value, annotation: str) -> bool:
    """JSON value check for DraftConfig's field annotations (bool is no int here)."""
    if annotation.endswith(" | None"):
        return value is None or _is_of_type(value, annotation[:-len(" | None")])
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "tuple[int, ...]":
        return isinstance(value, (list, tuple)) and all(_is_of_type(v, "int") for v in value)
    raise TypeError(f"DraftConfig: no JSON check for the annotation {annotation!r}")


def check_draft_vocab(ids: Tensor, vocab_size: int, what: str) -> None:
    """A draft vocabulary is int64 `[K]`, 1 <= K <= vocab_size, strictly increasing target ids in
    [0, vocab_size); ValueError starting with `what` otherwise."""
    V = vocab_size
    if ids.dtype != torch.int64 or ids.dim() != 1 or not 1 <= ids.numel() <= V:
        raise ValueError(f"{what} must be int64 [K] with 1 <= K <= vocab_size={V}, got "
                         f"{ids.dtype} of shape {list(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"{what} holds ids outside [0, vocab_size={V}): min {lo}, max {hi}")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError(f"{what} must be strictly increasing target ids (sorted, no repeats)")


@dataclass
class DraftCache:
    """One decoder layer's K/V: k, v `[B, Hkv, capacity, head_dim]`; `lengths [B]` int64 committed
    slots. Tree (scratch) nodes live in slots `lengths[b] + i` for i < scratch_len; their RoPE
    positions are in `scratch_pos [B, scratch_len]`."""

    k: Tensor
    v: Tensor
    lengths: Tensor
    scratch_len: int = 0
    scratch_pos: Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]


class _FrozenTargetParts:
    """Holds the target's embedding and LM head without registering them as submodules,
    so they never appear in the draft's parameters or state_dict."""

    def __init__(self, embed_tokens: nn.Module, lm_head: nn.Module):
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head


_INV_FREQ: dict = {}


def _inv_freq(D: int, theta: float, device: torch.device) -> Tensor:
    """RoPE inverse frequencies `[D/2]` float32, computed once per (D, theta, device)."""
    key = (D, float(theta), str(device))
    inv = _INV_FREQ.get(key)
    if inv is None:
        with torch.inference_mode(False), torch.no_grad():
            inv = theta ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
        _INV_FREQ[key] = inv
    return inv


def _rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """RoPE (rotate-half convention) of `x [B, H, T, D]` at integer `positions [B, T]`."""
    D = x.shape[-1]
    angles = positions.to(torch.float32)[:, None, :, None] * _inv_freq(D, theta, x.device)   # [B, 1, T, D/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    if x.dtype != torch.float32:     # fp32 math (the conversions are skipped for fp32 inputs: on
        x1, x2 = x1.float(), x2.float()   # a CPU each no-op call still costs a dispatch)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rms(x: Tensor, eps: float) -> Tensor:
    """`x / rms(x)` with fp32 statistics, in x's dtype (no weight)."""
    if x.dtype == torch.float32:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rms_norm(x: Tensor, norm: nn.RMSNorm) -> Tensor:
    """nn.RMSNorm's math in a few plain ops (on small CPU inputs the fused kernel costs more:
    benchmarks/RESULTS.md, Kernels); fp32 statistics."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return _rms(x, norm.eps) * norm.weight
    xf = x.float()
    return (_rms(xf, norm.eps) * norm.weight.float()).to(x.dtype)


class SparrowDraft(nn.Module):
    """`fc(concat(norm(embed(token_{t+1})), norm(fuse(feature_t))))` -> one decoder layer
    (RMSNorm, GQA attention with RoPE over the draft's slot positions via window_attn,
    SwiGLU MLP) -> hidden `[.., H]`; `logits()` applies the target's final norm + LM head (-inf
    outside the draft vocabulary when it has one)."""

    def __init__(self, config: DraftConfig, embed_tokens: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.config = config
        H, D = config.hidden_size, config.head_dim
        self.frozen = _FrozenTargetParts(embed_tokens, lm_head)
        n_feature_layers = len(config.feature_layers)
        # fuse: several target layers -> H (EAGLE-3); a single layer is used as is
        self.feature_fuse = nn.Linear(n_feature_layers * H, H, bias=False) if n_feature_layers > 1 else None
        self.embed_norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.feature_norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.input_norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(H, config.num_heads * D, bias=False)
        self.k_proj = nn.Linear(H, config.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(H, config.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(config.num_heads * D, H, bias=False)
        self.post_attn_norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.gate_proj = nn.Linear(H, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, H, bias=False)
        self.training_info: dict = {}     # free-form metadata saved in config.json ("training")
        self._fused_weights: dict = {}    # inference-only concatenated projections (see _fused)
        # draft vocabulary: sorted target ids [K] (placeholder until loaded or set_draft_vocab)
        self.draft_vocab: Tensor | None
        self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size, dtype=torch.int64)
                             if config.draft_vocab_size > 0 else None)

    # ------------------------------------------------------------------ building blocks
    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.config.head_dim)

    def _inference_weight(self, name: str, build, *params: Tensor) -> Tensor | None:
        """A weight derived from `params` by `build()` for inference only (no gradient is being
        recorded: drafting), cached and rebuilt whenever one of `params` moves or is updated in
        place (its storage or version counter changes). None while training."""
        if torch.is_grad_enabled():
            return None
        # inference tensors (a draft built under inference_mode) keep no version counter
        stamp = tuple((p.data_ptr(), -1 if p.is_inference() else p._version, p.dtype, tuple(p.shape))
                      for p in params)
        hit = self._fused_weights.get(name)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = (stamp, build())
            self._fused_weights[name] = hit
        return hit[1]

    def _fused(self, name: str, *linears: nn.Linear) -> Tensor | None:
        """The row-concatenation of `linears`' weights, stored input-major (`[in, out]`,
        contiguous) for one `x @ W` instead of several linears: on CPU, MKL runs small-M
        products faster from this layout (benchmarks/RESULTS.md, Kernels). None while training."""
        return self._inference_weight(
            name, lambda: torch.cat([m.weight.detach() for m in linears], dim=0).t().contiguous(),
            *(m.weight for m in linears))

    @staticmethod
    def _matmul(x: Tensor, weight_t: Tensor) -> Tensor:
        """`x [.., in] @ weight_t [in, out]` -> `[.., out]`."""
        return torch.mm(x.reshape(-1, x.shape[-1]), weight_t).view(*x.shape[:-1], weight_t.shape[1])

    def _linear(self, name: str, linear: nn.Linear, x: Tensor) -> Tensor:
        weight_t = self._fused(name, linear)
        return linear(x) if weight_t is None else self._matmul(x, weight_t)

    def _token_table(self) -> Tensor | None:
        """Inference-only `[V, H]` table of the token half of `input_states`: the fc applied to
        every normed token embedding (so drafting gathers a row instead of embedding, norming,
        concatenating and projecting). Only for vocabularies small enough to tabulate
        (V * H <= 2**22); None otherwise or while training."""
        cfg = self.config
        if cfg.vocab_size * cfg.hidden_size > 2 ** 22 or torch.is_grad_enabled():
            return None
        H = cfg.hidden_size
        embed_params = tuple(self.frozen.embed_tokens.parameters())

        def build() -> Tensor:
            ids = torch.arange(cfg.vocab_size, device=self.device)
            normed = _rms_norm(self.frozen.embed_tokens(ids).to(self.dtype), self.embed_norm)   # [V, H]
            return nn.functional.linear(normed, self.fc.weight[:, :H])                       # [V, H]
        return self._inference_weight("token_table", build, self.fc.weight, self.embed_norm.weight,
                                      *embed_params)

    def _feature_fc(self) -> Tensor | None:
        """Inference-only `[H, H]` input-major feature half of fc with feature_norm's weight
        folded in: `fc_b(norm(f)) = (f / rms(f)) @ _feature_fc()`. None while training."""
        H = self.config.hidden_size
        return self._inference_weight(
            "feature_fc", lambda: (self.fc.weight[:, H:] * self.feature_norm.weight).t().contiguous(),
            self.fc.weight, self.feature_norm.weight)

    def inference_weights(self) -> dict[str, Tensor] | None:
        """The layer's weights as drafting uses them, by name, for a compiled draft phase
        (cpu_draft / csrc/draft_cpu.cpp): `table [V, H]` (fc of every normed token embedding),
        `feature_fc [H, H]` (fc's feature half, feature_norm folded in), `fuse [F, H]` (empty
        for one feature layer), `input_norm [H]`, `qkv [H, (Hq + 2 Hkv) D]`, `o [Hq D, H]`,
        `post_norm [H]`, `gate_up [H, 2 I]`, `down [I, H]`; input-major, contiguous. None while
        training or when the vocabulary is too large to tabulate (see _token_table)."""
        table = self._token_table()
        if table is None:
            return None
        fuse = self._fused("fuse", self.feature_fuse) if self.feature_fuse is not None else \
            torch.empty(0, dtype=table.dtype, device=table.device)
        weights = {"table": table, "feature_fc": self._feature_fc(), "fuse": fuse,
                   "input_norm": self.input_norm.weight.detach(),
                   "qkv": self._fused("qkv", self.q_proj, self.k_proj, self.v_proj), "o": self._fused("o", self.o_proj),
                   "post_norm": self.post_attn_norm.weight.detach(),
                   "gate_up": self._fused("gate_up", self.gate_proj, self.up_proj),
                   "down": self._fused("down", self.down_proj)}
        return {name: w.contiguous() for name, w in weights.items()}

    def fuse(self, features: Tensor) -> Tensor:
        """Target features `[.., F]` -> `[.., H]` (the slot a fed-back draft hidden takes)."""
        return self.feature_fuse(features) if self.feature_fuse is not None else features

    def input_states(self, tokens: Tensor, fused: Tensor) -> Tensor:
        """tokens `[B, T]` and fused features `[B, T, H]` -> layer input `[B, T, H]`."""
        table = self._token_table()
        if table is not None:     # fc(cat(a, b)) = fc_a(a) + fc_b(b); fc_a of every token tabulated
            f = _rms(fused.to(self.dtype), self.feature_norm.eps)                       # weight folded in
            return nn.functional.embedding(tokens, table) + self._matmul(f, self._feature_fc())
        token_embed = self.frozen.embed_tokens(tokens).to(self.dtype)             # [B, T, H]
        both = torch.cat([_rms_norm(token_embed, self.embed_norm), _rms_norm(fused.to(self.dtype), self.feature_norm)],
                         dim=-1)
        return self.fc(both)                                                         # [B, T, H]

    def qkv(self, x: Tensor, positions: Tensor, query_start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Layer input `[B, T, H]` at `positions [B, T]` -> q `[B, Hq, T - query_start, D]` (queries
        only from entry query_start on), k, v `[B, Hkv, T, D]`."""
        cfg = self.config
        B, T, _ = x.shape
        h = _rms_norm(x, self.input_norm)
        weight = self._fused("qkv", self.q_proj, self.k_proj, self.v_proj) if query_start == 0 else None
        if weight is not None:       # one matmul, one RoPE over the q and k heads together
            Hq, Hkv = cfg.num_heads, cfg.num_kv_heads
            heads = self._matmul(h, weight).view(B, T, Hq + 2 * Hkv, cfg.head_dim).transpose(1, 2)
            qk = _rotate(heads[:, :Hq + Hkv], positions, cfg.rope_theta)
            return qk[:, :Hq].contiguous(), qk[:, Hq:].contiguous(), heads[:, Hq + Hkv:].contiguous()
        hq = h[:, query_start:]
        q = self.q_proj(hq).view(B, T - query_start, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [B, Hq, Tq, D]
        k = self.k_proj(h).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)    # [B, Hkv, T, D]
        v = self.v_proj(h).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)    # [B, Hkv, T, D]
        q = _rotate(q, positions[:, query_start:], cfg.rope_theta).contiguous()
        k = _rotate(k, positions, cfg.rope_theta).contiguous()
        return q, k, v.contiguous()

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """Residual stream `x [B, T, H]` + attention output `[B, Hq, T, D]` -> draft hidden `[B, T, H]`."""
        B, _, T, _ = attn.shape
        x = x + self._linear("o", self.o_proj, attn.transpose(1, 2).reshape(B, T, -1))
        h = _rms_norm(x, self.post_attn_norm)
        weight = self._fused("gate_up", self.gate_proj, self.up_proj)
        if weight is not None:
            gate, up = self._matmul(h, weight).chunk(2, dim=-1)
            return x + self._linear("down", self.down_proj, nn.functional.silu(gate) * up)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))

    def head_logits(self, hidden: Tensor) -> Tensor:
        """Target's frozen final norm + LM head over its whole vocabulary: `[.., H]` -> `[.., V]`
        (in the head's dtype). What the target would say after `hidden`; training's reference."""
        weight = next(self.frozen.lm_head.parameters(), None)
        return self.frozen.lm_head(hidden if weight is None else hidden.to(weight.dtype))

    def logits(self, hidden: Tensor) -> Tensor:
        """The draft's proposal logits `[.., H]` -> `[.., V]`: `head_logits`, with -inf outside
        the draft vocabulary when there is one. Drafting (no gradient) with a head of
        `Sequential(norm, bias-free Linear)` computes only the vocabulary's K rows."""
        if self.draft_vocab is None:
            return self.head_logits(hidden)
        vocab = self.draft_vocab
        rows = self.vocab_head_rows()
        if rows is None:
            full = self.head_logits(hidden)
            return full.masked_fill(self._outside_vocab(full.device), float("-inf"))
        norm = self.frozen.lm_head[0]
        x = norm(hidden.to(rows.dtype))
        small = nn.functional.linear(x, rows)                                          # [.., K]
        out = small.new_full((*small.shape[:-1], self.config.vocab_size), float("-inf"))
        out[..., vocab] = small
        return out

    def _outside_vocab(self, device: torch.device) -> Tensor:
        """Bool `[V]`, True for target ids outside the draft vocabulary."""
        mask = torch.ones(self.config.vocab_size, dtype=torch.bool, device=device)
        mask[self.draft_vocab.to(device)] = False
        return mask

    def vocab_head_rows(self) -> Tensor | None:
        """Inference-only `[K, H]` LM-head rows of the draft vocabulary, when the head is
        `Sequential(norm, bias-free Linear)` and no gradient is recorded; else None."""
        head = self.frozen.lm_head
        if self.draft_vocab is None or not isinstance(head, nn.Sequential) or len(head) != 2:
            return None
        linear = head[1]
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            return None
        return self._inference_weight("vocab_rows", lambda: linear.weight.detach()[self.draft_vocab].contiguous(),
                                      linear.weight, self.draft_vocab)

    def set_draft_vocab(self, ids: Tensor | None) -> None:
        """Give the draft a vocabulary: `ids` = distinct target ids (any order; stored sorted),
        or None for the whole vocabulary. Updates `config.draft_vocab_size`."""
        self._fused_weights.pop("vocab_rows", None)      # never reuse rows of another vocabulary
        if ids is None:
            self.draft_vocab = None
            self.config.draft_vocab_size = 0
            return
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"SparrowDraft.set_draft_vocab: ids must be a non-empty 1-D integer tensor, got "
                             f"{ids.dtype} of shape {list(ids.shape)}")
        ids = torch.sort(ids.to(torch.int64).cpu()).values
        self._check_vocab(ids, "ids")
        self.draft_vocab = ids.to(self.device)
        self.config.draft_vocab_size = int(ids.numel())

    def _check_vocab(self, ids: Tensor, what: str) -> None:
        check_draft_vocab(ids, self.config.vocab_size, f"SparrowDraft: {what}")

    # ------------------------------------------------------------------ cache API (engine)
    def new_cache(self, batch_size: int, capacity: int) -> DraftCache:
        cfg = self.config
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"SparrowDraft.new_cache: batch_size and capacity must be >= 1, "
                             f"got {batch_size}, {capacity}")
        shape = (batch_size, cfg.num_kv_heads, capacity, cfg.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)                 # [B, Hkv, cap, D]
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)                 # [B, Hkv, cap, D]
        lengths = torch.zeros(batch_size, dtype=torch.int64, device=self.device)     # [B]
        return DraftCache(k=k, v=v, lengths=lengths)

    def reset_scratch(self, cache: DraftCache) -> None:
        cache.scratch_len = 0
        cache.scratch_pos = None

    def _check_cache(self, cache: DraftCache, B: int) -> None:
        if not isinstance(cache, DraftCache):
            raise ValueError(f"SparrowDraft: cache must be a DraftCache (from new_cache), got {type(cache).__name__}")
        if cache.batch_size != B:
            raise ValueError(f"SparrowDraft: cache was made for batch {cache.batch_size}, got inputs of batch {B}")

    def _write(self, cache: DraftCache, k: Tensor, v: Tensor, slots: Tensor, keep: Tensor | None = None) -> None:
        """Store k, v `[B, Hkv, T, D]` at cache slots `slots [B, T]` where `keep [B, T]`
        (None: every entry, without the nonzero pass)."""
        if keep is None:
            B, T = slots.shape
            rows = torch.arange(B, device=slots.device)[:, None].expand(B, T)
            cache.k[rows, :, slots] = k.transpose(1, 2).to(cache.k.dtype)
            cache.v[rows, :, slots] = v.transpose(1, 2).to(cache.v.dtype)
            return
        rows, cols = keep.nonzero(as_tuple=True)                                     # [N], [N]
        cache.k[rows, :, slots[rows, cols]] = k.transpose(1, 2)[rows, cols].to(cache.k.dtype)
        cache.v[rows, :, slots[rows, cols]] = v.transpose(1, 2)[rows, cols].to(cache.v.dtype)

    def extend(self, cache: DraftCache, tokens: Tensor, features: Tensor, valid: Tensor) -> Tensor:
        """Commit T entries per row (entry t = target feature at position t + the token at t+1);
        only the first valid[b] entries of row b are real. Drops scratch nodes first.
        Returns draft hidden `[B, T, H]`; hidden[b, valid[b]-1] predicts the next token."""
        cfg = self.config
        check_tensor("SparrowDraft", "tokens", tokens, (None, None), torch.int64, self.device)
        B, T = tokens.shape
        self._check_cache(cache, B)
        check_tensor("SparrowDraft", "features", features, (B, T, cfg.feature_size), None, self.device)
        check_tensor("SparrowDraft", "valid", valid, (B,), torch.int64, self.device)
        if T == 0:
            raise ValueError("SparrowDraft.extend: tokens must hold at least one entry (T >= 1)")
        self.reset_scratch(cache)
        valid = valid.clamp(0, T)
        new_lengths = cache.lengths + valid                                          # [B]
        if bool((new_lengths > cache.capacity).any()):
            b = int((new_lengths > cache.capacity).nonzero()[0, 0])
            raise ValueError(f"SparrowDraft.extend: row {b} needs {int(new_lengths[b])} draft cache slots "
                             f"but the cache capacity is {cache.capacity}")
        offsets = torch.arange(T, device=self.device)
        is_real = offsets[None, :] < valid[:, None]                                  # [B, T]
        positions = cache.lengths[:, None] + offsets[None, :]                        # [B, T]
        features = torch.where(is_real[..., None], features, 0)                     # padding never leaks in
        x = self.input_states(torch.where(is_real, tokens, 0).clamp(0, cfg.vocab_size - 1),
                              self.fuse(features))                                   # [B, T, H]
        q, k, v = self.qkv(x, positions)
        self._write(cache, k, v, positions, is_real)
        if cfg.window <= 0 and T > 1 and not bool(cache.lengths.any()) and bool((valid == T).all()):
            # a full causal prefill of an empty cache (the visual-KV baseline's prompt): plain
            # causal attention, exactly what window_attn computes here, through the fused SDPA
            group = cfg.num_heads // cfg.num_kv_heads
            attn = nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), is_causal=True,
                scale=self.scale)                                                    # [B, Hq, T, D]
        else:
            kv_len = new_lengths.clamp(min=1)                                        # [B]
            used = int(kv_len.max())
            attn, _ = ops.window_attn(q, cache.k[:, :, :used], cache.v[:, :, :used], kv_len, positions,
                                      cfg.window, cfg.n_anchor, None, self.scale)    # [B, Hq, T, D]
        cache.lengths = new_lengths
        return self.finish(x, attn)

    def draft_step(self, cache: DraftCache, tokens: Tensor, prev_hidden: Tensor, depth: Tensor,
                   tree_mask: Tensor) -> Tensor:
        """Expand K tree nodes per row without committing them. tokens `[B, K]`, prev_hidden
        `[B, K, H]` (the draft hidden that predicted each node), depth `[B, K]` >= 1 (node
        position = lengths + depth - 1), tree_mask `[B, K, M]` over all M scratch nodes so far
        (the last K columns are these nodes). Returns hidden `[B, K, H]`."""
        cfg = self.config
        check_tensor("SparrowDraft", "tokens", tokens, (None, None), torch.int64, self.device)
        B, K = tokens.shape
        self._check_cache(cache, B)
        M = cache.scratch_len + K
        check_tensor("SparrowDraft", "prev_hidden", prev_hidden, (B, K, cfg.hidden_size), None, self.device)
        check_tensor("SparrowDraft", "depth", depth, (B, K), torch.int64, self.device)
        check_tensor("SparrowDraft", "tree_mask", tree_mask, (B, K, M), torch.bool, self.device)
        if bool((depth < 1).any()):
            raise ValueError(f"SparrowDraft.draft_step: depth must be >= 1, got min {int(depth.min())}")
        if bool((cache.lengths + M > cache.capacity).any()):
            raise ValueError(f"SparrowDraft.draft_step: {M} scratch nodes after the committed slots exceed "
                             f"the cache capacity {cache.capacity} (max committed {int(cache.lengths.max())})")
        positions = cache.lengths[:, None] + depth - 1                               # [B, K]
        x = self.input_states(tokens.clamp(0, cfg.vocab_size - 1), prev_hidden)     # [B, K, H]
        q, k, v = self.qkv(x, positions)
        node_slots = cache.lengths[:, None] + cache.scratch_len + torch.arange(K, device=self.device)  # [B, K]
        self._write(cache, k, v, node_slots)                                         # every node is stored
        scratch_pos = positions if cache.scratch_pos is None else torch.cat([cache.scratch_pos, positions], 1)
        cache.scratch_pos, cache.scratch_len = scratch_pos, M                        # [B, M]

        # One window_attn call over the committed prefix + all M scratch nodes: the scratch
        # slots are the last M key slots and follow the tree mask only (docs/ops.md), the
        # prefix follows the window rule at each node's position. The M - K older nodes enter
        # as dummy queries at position -1 (they see only themselves; outputs dropped).
        older = M - K
        node_rows = tree_mask                                                        # [B, K, M]
        if cfg.window > 0:               # the window rule among scratch nodes, on their positions
            key_pos, query_pos = scratch_pos[:, None, :], positions[:, :, None]
            node_rows = node_rows & ((key_pos >= query_pos - cfg.window + 1) | (key_pos < cfg.n_anchor))
        if older:
            eye = torch.eye(older, M, dtype=torch.bool, device=self.device).expand(B, older, M)
            full_mask = torch.cat([eye, node_rows], dim=1)                           # [B, M, M]
            q_all = torch.cat([q.new_zeros(B, q.shape[1], older, q.shape[3]), q], dim=2)
            q_pos = torch.cat([positions.new_full((B, older), -1), positions], dim=1)
        else:
            full_mask, q_all, q_pos = node_rows.contiguous(), q, positions
        kv_len = cache.lengths + M                                                   # [B]
        used = int(kv_len.max())
        attn, _ = ops.window_attn(q_all, cache.k[:, :, :used], cache.v[:, :, :used], kv_len, q_pos,
                                  cfg.window, cfg.n_anchor, full_mask, self.scale)   # [B, Hq, M, D]
        attn = attn[:, :, older:]                                                    # [B, Hq, K, D]
        return self.finish(x, attn)

    # ------------------------------------------------------------------ full-sequence forwards (training, tests)
    def forward(self, tokens: Tensor, features: Tensor, valid: Tensor, n_anchor: int | None = None) -> Tensor:
        """Plain causal forward over entries at slots 0..T-1 (no cache): tokens `[B, T]`,
        features `[B, T, F]`, valid `[B]`. Equals `extend` on an empty cache."""
        return self.unrolled_forward(tokens, features, valid, steps=1, n_anchor=n_anchor)[0]

    def unrolled_forward(self, tokens: Tensor, features: Tensor, valid: Tensor, steps: int,
                         query_start: int = 0, n_anchor: int | None = None) -> list[Tensor]:
        """Training-time test (MTP): `steps` draft steps over a whole sequence at once.

        Entries 0..S-1 (tokens `[B, S]`, target features `[B, S, F]`, valid `[B]`) sit at slots
        0..S-1; only entries >= `query_start` (the text part; earlier entries are a prefix such as
        IVSB visual states) are queried. Step 1 is the plain forward. In step k >= 2 chain e
        (entry i = query_start + e) feeds its step k-1 hidden back with token `tokens[i + k - 1]`
        at position i + k - 1, seeing the real entries <= its base (window rule at its
        own position) and its own earlier unrolled entries, exactly as draft_step sees the
        committed cache and its ancestors. Returns per step hidden `[B, S - query_start, H]`.
        Needs window <= 0 or window >= steps.
        """
        cfg = self.config
        B, S = tokens.shape
        if cfg.window > 0 and cfg.window < steps:
            raise ValueError(f"SparrowDraft.unrolled_forward: window={cfg.window} must be 0 or >= steps={steps}")
        anchor = cfg.n_anchor if n_anchor is None else n_anchor
        Tq = S - query_start
        dev = tokens.device
        slot = torch.arange(S, device=dev)
        is_real = slot[None, :] < valid[:, None]                                     # [B, S]
        tokens = torch.where(is_real, tokens, 0).clamp(0, cfg.vocab_size - 1)
        features = torch.where(is_real[..., None], features, 0)                     # padding never leaks in
        positions = slot[None, :].expand(B, S)                                       # [B, S]
        x = self.input_states(tokens, self.fuse(features))                           # [B, S, H]
        q, k_real, v_real = self.qkv(x, positions, query_start)                      # real entries' keys
        kv_len = valid.clamp(1, S)                                                   # [B]
        base_pos = positions[:, query_start:]                                        # [B, Tq]
        attn, _ = ops.window_attn(q, k_real, v_real, kv_len, base_pos,
                                  cfg.window, anchor, None, self.scale)              # [B, Hq, Tq, D]
        hidden = self.finish(x[:, query_start:], attn)                               # [B, Tq, H]
        outputs = [hidden]
        chain = torch.arange(Tq, device=dev)
        own_k, own_v = [], []                                                        # unrolled keys per step
        eye = torch.eye(Tq, dtype=torch.bool, device=dev)
        for step in range(2, steps + 1):
            shift = step - 1
            token_index = (query_start + chain + shift).clamp(max=S - 1)             # [Tq]
            step_tokens = tokens[:, token_index]                                     # [B, Tq]
            step_pos = base_pos + shift                                              # [B, Tq]
            xs = self.input_states(step_tokens, hidden)                              # [B, Tq, H]
            qs, ks, vs = self.qkv(xs, step_pos)
            own_k.append(ks)
            own_v.append(vs)
            n_blocks = step - 1
            # the tree region = own unrolled keys of steps 2..step; only the last block holds real
            # queries, the earlier blocks are zero dummies that see themselves (outputs unused)
            tree = torch.zeros(n_blocks * Tq, n_blocks * Tq, dtype=torch.bool, device=dev)
            for block in range(n_blocks):
                tree[block * Tq:(block + 1) * Tq, block * Tq:(block + 1) * Tq] = eye
            last = (n_blocks - 1) * Tq
            for block in range(n_blocks - 1):   # earlier own entries: within the window since window >= steps
                tree[last + chain, block * Tq + chain] = True
            q_all = torch.cat([torch.zeros_like(qs).repeat(1, 1, n_blocks - 1, 1), qs], dim=2)
            k_all = torch.cat([k_real] + own_k, dim=2)                               # [B, Hkv, S + n_blocks*Tq, D]
            v_all = torch.cat([v_real] + own_v, dim=2)
            window = cfg.window - shift if cfg.window > 0 else 0                     # offset: real keys <= base
            # dummies sit at position -1: they see no real key (only themselves), so cost ~nothing
            dummy_pos = torch.cat([torch.full((B, (n_blocks - 1) * Tq), -1, dtype=torch.int64, device=dev),
                                   base_pos], dim=1)                                 # [B, n_blocks*Tq]
            attn_all, _ = ops.window_attn(
                q_all, k_all, v_all, torch.full((B,), k_all.shape[2], dtype=torch.int64, device=dev),
                dummy_pos, window, anchor, tree[None].expand(B, -1, -1).contiguous(),
                self.scale)                                                          # [B, Hq, n_blocks*Tq, D]
            hidden = self.finish(xs, attn_all[:, :, last:])                          # [B, Tq, H]
            outputs.append(hidden)
        return outputs

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write model.safetensors (draft weights only, never the target's) + config.json."""
        os.makedirs(path, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        payload = {"config": self.config.to_dict(), "training": self.training_info}
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)

    @classmethod
    def from_target(cls, config: DraftConfig, target) -> "SparrowDraft":
        """A fresh (randomly initialised) draft bound to `target`'s embedding and LM head."""
        if config.hidden_size != target.hidden_size:
            raise ValueError(f"SparrowDraft: config.hidden_size={config.hidden_size} does not match the "
                             f"target's hidden_size={target.hidden_size}")
        if config.vocab_size != target.vocab_size:
            raise ValueError(f"SparrowDraft: config.vocab_size={config.vocab_size} does not match the "
                             f"target's vocab_size={target.vocab_size}")
        bad = [layer for layer in config.target_layers if not 0 <= layer <= target.num_layers]
        if bad:
            raise ValueError(f"SparrowDraft: feature layers {bad} are outside the target's layers "
                             f"0..{target.num_layers}")
        draft = cls(config, target.embed_tokens(), target.lm_head())
        return draft.to(device=target.device, dtype=target.dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, target) -> "SparrowDraft":
        """Read config.json + model.safetensors from `path`; embedding and LM head from `target`."""
        config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
        for p in (config_path, weights_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"SparrowDraft.load: {p} does not exist (expected a draft "
                                        f"directory with {CONFIG_NAME} and {WEIGHTS_NAME})")
        with open(config_path) as f:
            try:
                payload = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"SparrowDraft.load: {config_path} is not JSON ({err})") from err
        if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
            raise ValueError(f"SparrowDraft.load: {config_path} has no 'config' object, so {path} is not a "
                             f"Sparrow draft directory (a target checkpoint? drafts are written by train-draft)")
        draft = cls.from_target(DraftConfig.from_dict(payload["config"]), target)
        try:
            state = load_file(weights_path, device=str(draft.device))
        except Exception as err:  # noqa: BLE001 (safetensors raises its own error type or OSError)
            raise ValueError(f"SparrowDraft.load: {weights_path} is not a readable safetensors file "
                             f"({type(err).__name__}: {err})") from err
        try:
            draft.load_state_dict(state, strict=True)
        except RuntimeError as err:  # missing / unexpected keys, size mismatches
            detail = " ".join(str(err).split())
            raise ValueError(f"SparrowDraft.load: the weights in {weights_path} do not fit its config "
                             f"({detail})") from err
        if draft.draft_vocab is not None:
            draft._check_vocab(draft.draft_vocab.cpu(), f"draft_vocab in {weights_path}")
        draft.training_info = payload.get("training", {})
        return draft


def load_draft(path: str | os.PathLike, target) -> SparrowDraft:
    """Shorthand for `SparrowDraft.load(path, target)`."""
    return SparrowDraft.load(path, target)


# The committed draft the CLI and the demo use: Sparrow's VATA (text-only window cache) + MTP,
# without IVSB, which lowered agreement on the tiny LM (benchmarks/RESULTS.md, ablations).
DEFAULT_DRAFT = "vata_mtp"
# For the committed Qwen2.5-VL world target: the full recipe (VATA + IVSB + MTP), named as the paper does.
DEFAULT_WORLD_DRAFT = "sparrow"


def committed_draft_dir(name: str | None = None, target: str = "tiny") -> str:
    """Directory of a committed draft (e.g. 'sparrow', 'visual_kv') of a committed target: 'tiny'
    (the built-in tiny VLM; checkpoints/drafts) or 'qwen2_5_vl_world' (checkpoints/qwen2_5_vl_world_drafts).
    `name` defaults to that target's default draft."""
    if target == "tiny":
        return str(CHECKPOINTS / "drafts" / (name or DEFAULT_DRAFT))
    if target == WORLD_TARGET:
        return str(CHECKPOINTS / f"{WORLD_TARGET}_drafts" / (name or DEFAULT_WORLD_DRAFT))
    raise ValueError(f"committed_draft_dir: target {target!r} has no committed drafts; expected 'tiny' or "
                     f"{WORLD_TARGET!r}")


__all__ = ["DEFAULT_DRAFT", "DEFAULT_WORLD_DRAFT", "DraftCache", "DraftConfig", "SparrowDraft", "check_draft_vocab",
           "committed_draft_dir", "load_draft"]
