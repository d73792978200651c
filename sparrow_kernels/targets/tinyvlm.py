"""The built-in tiny video LM (plain PyTorch) and `TinyVLMTarget`, its implementation of
the `Target` protocol: batched prefill with right padding, tree-masked forward over a
preallocated KV cache, commit through `sparrow_kernels.ops.kv_compact`, greedy decoding.
It must not depend on transformers, and it never trains (see training/train_target.py).

Video -> tokens: every frame is cut into 8x8 patches (16 tokens for 32x32 frames); each
patch sees the frame itself and its difference to the frame `motion_delta` of the video
duration earlier, so motion direction is visible in a single token. All patches of a
frame share the RoPE position t * visual_rope_span (t = normalized time in [0, 1]) plus
Fourier features of t; text positions follow at text_position_start + i. A longer video
of the same content is denser sampling of the same t range, which is what lets the model
read videos far longer than those it was trained on.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparrow_kernels.ops import kv_compact
from sparrow_kernels.ops.checks import check_tensor

from .base import PrefillOutput, TargetState, TreeOutput, VideoPrompt
from .decoding import autoregressive_generate

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "tinyvlm"


@dataclass
class TinyVLMConfig:
    vocab_size: int
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    frame_size: int = 32
    patch_size: int = 8
    motion_delta: float = 0.25          # lag of the difference frame, fraction of the duration
    visual_rope_span: float = 32.0      # visual RoPE position = t * span
    text_position_start: float = 33.0   # first text token's RoPE position
    fourier_features: int = 8           # sin/cos pairs of t added to visual embeddings
    vision_stem_channels: int = 0       # > 0: a full-resolution 3x3 conv stem (this many
                                        # channels, GELU) before the patch conv; 0: none
    visual_reference_frames: int = 0    # > 0: text queries see visual keys with a bias of
                                        # -log(max(1, frames / this)), so a densely sampled long
                                        # video carries the attention mass of a `this`-frame one
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    video_token_id: int = 3

    def visual_bias(self, num_frames: int) -> float:
        """Additive attention bias of visual keys for text queries (0 when disabled)."""
        if self.visual_reference_frames <= 0:
            return 0.0
        return -math.log(max(1.0, num_frames / self.visual_reference_frames))

    @property
    def patches_per_frame(self) -> int:
        return (self.frame_size // self.patch_size) ** 2

    def to_json(self) -> str:
        return json.dumps({"model_type": "sparrow_tinyvlm", **asdict(self)}, indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "TinyVLMConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------- layers

def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions [B, T] (float allowed) -> cos, sin [B, 1, T, head_dim // 2]."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None, :, None] * inv_freq                 # [B, 1, T, D/2]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D] rotated by (cos, sin) [B, 1, T, D/2] (half-split convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class VisionEncoder(nn.Module):
    """Frames -> visual embeddings, one token per patch. Each token reads a window of
    2x2 patches centred on its patch (kernel 2p, stride p), so every object fits whole
    inside some token's window; channels are RGB and the RGB difference to the frame
    `motion_delta` earlier."""

    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.cfg = cfg
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.vision_stem_channels
        self.stem = nn.Sequential(nn.Conv2d(6, c, kernel_size=3, padding=1), nn.GELU()) if c > 0 else None
        self.patch_conv = nn.Conv2d(c if c > 0 else 6, d, kernel_size=2 * p, stride=p, padding=p // 2)
        self.patch_mlp = nn.Sequential(nn.GELU(), nn.Linear(d, d))
        self.spatial = nn.Parameter(torch.randn(cfg.patches_per_frame, d) * 0.02)
        self.time_proj = nn.Linear(2 * cfg.fourier_features, d)

    def forward(self, frames: Tensor, times: Tensor) -> Tensor:
        """frames [B, T, S, S, 3] float in [0, 1]; times [T] -> [B, T * P, d]."""
        B, T, S, _, _ = frames.shape
        lag = 0 if T == 1 else max(1, round(self.cfg.motion_delta * (T - 1)))
        prev_index = (torch.arange(T, device=frames.device) - lag).clamp(min=0)
        x = torch.cat([frames * 2 - 1, (frames - frames[:, prev_index]) * 2], dim=-1)   # [B, T, S, S, 6]
        x = x.reshape(B * T, S, S, 6).permute(0, 3, 1, 2)                                # [B*T, 6, S, S]
        if self.stem is not None:
            x = self.stem(x)
        x = self.patch_conv(x)                                                           # [B*T, d, S/p, S/p]
        x = x.flatten(2).transpose(1, 2).reshape(B, T, -1, self.cfg.hidden_size)         # [B, T, P, d]
        emb = self.patch_mlp(x) + self.spatial
        freqs = math.pi * 2.0 ** torch.arange(self.cfg.fourier_features, device=frames.device)
        angles = times.float()[:, None] * freqs                                          # [T, F]
        emb = emb + self.time_proj(torch.cat([angles.sin(), angles.cos()], -1).to(emb.dtype))[None, :, None]
        return emb.reshape(B, T * emb.shape[2], -1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.qkv = nn.Linear(d, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)

    def qkv_heads(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, d] -> q [B, Hq, T, D], k, v [B, Hkv, T, D] (RoPE applied to q, k)."""
        B, T, _ = x.shape
        cfg = self.cfg
        qkv = self.qkv(self.attn_norm(x)).view(B, T, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
        qkv = qkv.transpose(1, 2)
        q = qkv[:, :cfg.num_heads]
        k = qkv[:, cfg.num_heads:cfg.num_heads + cfg.num_kv_heads]
        v = qkv[:, cfg.num_heads + cfg.num_kv_heads:]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """Residual + output projection of attn [B, Hq, T, D], then the SwiGLU MLP."""
        B, _, T, _ = attn.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyVLM(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.vision = VisionEncoder(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def frame_times(self, num_frames: int, device=None) -> Tensor:
        """Normalized times [T] of T evenly spaced frames covering the video."""
        if num_frames == 1:
            return torch.zeros(1, device=device)
        return torch.linspace(0.0, 1.0, num_frames, device=device)

    def causal_forward(self, x: Tensor, positions: Tensor, layers: Sequence[int] = (),
                       kv: Tensor | None = None, text_queries: tuple | None = None
                       ) -> tuple[Tensor, dict[int, Tensor]]:
        """Full causal pass over x [B, T, d] at RoPE positions [B or 1, T]. Optionally
        writes every layer's K/V into kv[2l / 2l+1, :, :, :T]. `text_queries` =
        (query_index [B, Lt], lengths [B], n_visual [B], visual_bias [B]): those queries'
        attention is recomputed with the visual-key bias (visual queries see only visual
        keys, where a uniform bias cancels). Returns the last layer's output (pre final
        norm) and {layer: hidden} for the requested layers."""
        cfg = self.cfg
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        group = cfg.num_heads // cfg.num_kv_heads
        collected = {0: x} if 0 in layers else {}
        B, T = x.shape[:2]
        if text_queries is not None:
            query_index, lengths, n_visual, visual_bias = text_queries
            Lt = query_index.shape[1]
            keys = torch.arange(T, device=x.device)[None, None, :]
            allowed = (keys <= query_index[:, :, None]) & (keys < lengths[:, None, None])     # [B, Lt, T]
            text_mask = torch.zeros(allowed.shape, device=x.device).masked_fill_(~allowed, float("-inf"))
            text_mask += (keys < n_visual[:, None, None]) * visual_bias[:, None, None]
            text_mask = text_mask[:, None, None].expand(B, 1, group, Lt, T).reshape(B, 1, group * Lt, T)
            gather_index = query_index[:, None, :, None].expand(B, cfg.num_heads, Lt, cfg.head_dim)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv_heads(x, cos, sin)
            if kv is not None:
                kv[2 * i, :, :, :T] = k
                kv[2 * i + 1, :, :, :T] = v
            k_heads, v_heads = k, v
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if text_queries is not None:
                q_text = q.gather(2, gather_index).reshape(B, cfg.num_kv_heads, group * Lt, cfg.head_dim)
                attn_text = F.scaled_dot_product_attention(q_text, k_heads, v_heads, attn_mask=text_mask.to(q.dtype))
                attn = attn.scatter(2, gather_index, attn_text.reshape(B, cfg.num_heads, Lt, cfg.head_dim))
            x = layer.finish(x, attn)
            if i + 1 in layers:
                collected[i + 1] = x
        return x, collected

    def forward_train(self, frames: Tensor, text_ids: Tensor) -> Tensor:
        """Training pass. frames [B, T, S, S, 3] uint8 (same T for the batch), text_ids
        [B, L] (right padded). Returns logits [B, L, V] at the text positions (logit j
        predicts text token j + 1)."""
        cfg = self.cfg
        B, T = frames.shape[:2]
        times = self.frame_times(T, frames.device)
        visual = self.vision(frames.float() / 255.0, times)                              # [B, T*P, d]
        text = self.embed(text_ids)                                                       # [B, L, d]
        x = torch.cat([visual.to(text.dtype), text], dim=1)
        L = text_ids.shape[1]
        positions = torch.cat([
            (times * cfg.visual_rope_span).repeat_interleave(cfg.patches_per_frame),
            cfg.text_position_start + torch.arange(L, device=frames.device, dtype=torch.float32)])[None]
        text_queries = None
        bias = cfg.visual_bias(T)
        if bias != 0.0:
            n_vis = visual.shape[1]
            device = frames.device
            text_queries = (n_vis + torch.arange(L, device=device)[None].expand(B, L),
                            torch.full((B,), n_vis + L, device=device), torch.full((B,), n_vis, device=device),
                            torch.full((B,), bias, device=device))
        out, _ = self.causal_forward(x, positions, text_queries=text_queries)
        return self.lm_head(self.final_norm(out[:, visual.shape[1]:]))


# ----------------------------------------------------------------------------- target

@dataclass
class TinyVLMState(TargetState):
    kv: Tensor                      # [2 * n_layers, B, Hkv, capacity, D], K and V of layer l at 2l, 2l+1
    position_offset: Tensor         # [B] float: RoPE position of text slot s is s + position_offset[b]
    tree_size: int = 0              # nodes written by the last forward_tree (commit checks against it)
    n_visual: Tensor | None = None  # [B] visual tokens per row (slots 0 .. n_visual[b] - 1)
    visual_bias: Tensor | None = None   # [B] attention bias of visual keys (TinyVLMConfig.visual_bias)


class _TreeKeys:
    """What the N tree nodes of one forward_tree attend to, split in two softmax pieces
    merged by log-sum-exp: the visual keys (visible to every node, no mask at all: one dense
    call, the cost that grows with the video) and the text keys (committed text + the tree
    slots under tree_mask; small). The visual piece's log-sum-exp takes the visual-key bias,
    which is exactly softmax with the bias added to every visual score. Query heads of one
    GQA group are folded into the query axis ([B, Hkv, G*N, D]), so K/V are read once per group."""

    def __init__(self, state: "TinyVLMState", tree_mask: Tensor, group: int):
        device = tree_mask.device
        B, N = tree_mask.shape[:2]
        lengths = state.lengths
        n_visual = state.n_visual if state.n_visual is not None else torch.zeros_like(lengths)
        self.group, self.N = group, N
        nv = n_visual.tolist()
        self.n_visual = nv
        self.uniform = all(n == nv[0] for n in nv)
        text_len = lengths - n_visual                                              # [B] committed text
        Tt = int(text_len.max()) + N
        j = torch.arange(Tt, device=device)
        self.text_slots = n_visual[:, None] + j                                    # [B, Tt]
        in_prefix = j[None, :] < text_len[:, None]                                 # [B, Tt]
        visible = in_prefix[:, None, :].expand(B, N, Tt).clone()                   # [B, N, Tt]
        tree_cols = (text_len[:, None] + torch.arange(N, device=device)).clamp(max=Tt - 1)
        visible.scatter_(2, tree_cols[:, None, :].expand(B, N, N), tree_mask)
        visible = visible[:, None, None].expand(B, 1, group, N, Tt).reshape(B, 1, group * N, Tt)
        self.text_mask = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))
        self.text_len = Tt
        bias = state.visual_bias if state.visual_bias is not None else torch.zeros(B, device=device)
        self.visual_bias = bias.to(torch.float32)[:, None, None]                    # [B, 1, 1]

    def _visual(self, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor] | None:
        """(out [B, Hkv, G*N, D], lse [B, Hkv, G*N]) over each row's visual keys, or None."""
        if max(self.n_visual) == 0:
            return None
        if self.uniform:
            n = self.n_visual[0]
            return _attention_with_lse(q, k_cache[:, :, :n], v_cache[:, :, :n])
        outs, lses = [], []
        for b, n in enumerate(self.n_visual):                                      # ragged rows
            if n == 0:
                outs.append(torch.zeros_like(q[b:b + 1]))
                lses.append(torch.full(q.shape[1:3], float("-inf"), device=q.device)[None])
                continue
            o, l = _attention_with_lse(q[b:b + 1], k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n])
            outs.append(o)
            lses.append(l)
        return torch.cat(outs), torch.cat(lses)

    def attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """q [B, Hq, N, D] (this layer's tree queries, K/V already written to the cache
        [B, Hkv, capacity, D]) -> attention output [B, Hq, N, D]."""
        B, Hq, N, D = q.shape
        Hkv = k_cache.shape[1]
        qg = q.reshape(B, Hkv, self.group * N, D)
        if self.uniform:
            n = self.n_visual[0]
            k_text = k_cache[:, :, n:n + self.text_len]
            v_text = v_cache[:, :, n:n + self.text_len]
        else:
            index = self.text_slots.clamp(max=k_cache.shape[2] - 1)[:, None, :, None].expand(B, Hkv, -1, D)
            k_text, v_text = k_cache.gather(2, index), v_cache.gather(2, index)
        scores = torch.matmul(qg, k_text.transpose(-1, -2)) * (D ** -0.5) + self.text_mask   # [B, Hkv, G*N, Tt]
        lse_text = torch.logsumexp(scores, dim=-1)                                 # [B, Hkv, G*N]
        safe_text = torch.where(torch.isinf(lse_text), 0.0, lse_text)              # a node may see no text key
        out = torch.matmul(torch.exp(scores - safe_text[..., None]), v_text)
        visual = self._visual(qg, k_cache, v_cache)
        if visual is not None:
            out_vis, lse_vis = visual
            lse_vis = lse_vis + self.visual_bias
            top = torch.maximum(lse_vis, lse_text)
            top = torch.where(torch.isinf(top), 0.0, top)
            w_vis, w_text = torch.exp(lse_vis - top), torch.exp(lse_text - top)
            total = (w_vis + w_text).clamp(min=torch.finfo(w_vis.dtype).tiny)
            out = (out_vis * w_vis[..., None] + out * w_text[..., None]) / total[..., None]
        return out.reshape(B, Hq, N, D)


def _attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Unmasked softmax attention and its log-sum-exp: q [B, H, M, D], k, v [B, H, T, D] ->
    (out [B, H, M, D], lse [B, H, M]), by the sparrow op (window <= 0: every key, no anchors,
    no tree). On the CPU its shared-prefix path scores each key block against all M query rows
    at once, so a tree's queries read the visual keys once, as a plain decode step does."""
    from sparrow_kernels import ops

    B, _, M, D = q.shape
    T = k.shape[2]
    kv_len = torch.full((B,), T, dtype=torch.int64, device=q.device)
    q_pos = torch.full((B, M), T - 1, dtype=torch.int64, device=q.device)
    return ops.window_attn(q, k, v, kv_len, q_pos, 0, 0, None, D ** -0.5)


class TinyVLMTarget:
    """The tiny video LM behind the `Target` protocol (fp32 inference)."""

    def __init__(self, model: TinyVLM, tokenizer=None, device: str | torch.device = "cpu"):
        self.model = model.to(device).float().eval()
        self.config = model.cfg
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.num_layers = self.config.num_layers
        self.hidden_size = self.config.hidden_size
        self.vocab_size = self.config.vocab_size
        self.eos_token_ids = (self.config.eos_token_id,)
        self.video_token_id = self.config.video_token_id
        self._head = nn.Sequential(self.model.final_norm, self.model.lm_head)
        for p in self.model.parameters():
            p.requires_grad_(False)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "TinyVLMTarget":
        """Load model.safetensors + config.json (+ tokenizer.json) from `path` (default:
        the committed checkpoint)."""
        from safetensors.torch import load_file

        from ..data.tokenizer import WordTokenizer

        path = Path(path) if path is not None else DEFAULT_CHECKPOINT
        for name in ("config.json", "model.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"tiny VLM checkpoint {path} lacks {name}")
        cfg = TinyVLMConfig.from_dict(json.loads((path / "config.json").read_text()))
        model = TinyVLM(cfg)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        tokenizer = WordTokenizer.load(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
        return cls(model, tokenizer, device)

    # -- what the draft reuses ---------------------------------------------------------
    def embed_tokens(self) -> nn.Module:
        return self.model.embed

    def lm_head(self) -> nn.Module:
        return self._head

    # -- video length helpers ----------------------------------------------------------
    def visual_tokens_for(self, num_frames: int) -> int:
        return int(num_frames) * self.config.patches_per_frame

    def prompt_lengths(self, prompts: Sequence[VideoPrompt]) -> list[int]:
        """Tokens each prompt will occupy after prefill (visual + text), without running it;
        the engine sizes the KV cache from this."""
        lengths = []
        for i, p in enumerate(prompts):
            frames = p.frames
            if not isinstance(frames, torch.Tensor) or frames.dim() != 4:
                raise ValueError(f"prompts[{i}].frames must be a tensor [T, H, W, 3]")
            lengths.append(self.visual_tokens_for(frames.shape[0]) + len(self._prompt_ids(i, p)))
        return lengths

    def frames_for(self, visual_tokens: int) -> int:
        """Frames whose visual tokens come closest to `visual_tokens` (at least 1)."""
        return max(1, round(visual_tokens / self.config.patches_per_frame))

    def make_prompt(self, frames: Tensor, question: str | None = None) -> VideoPrompt:
        """A VideoPrompt asking `question` (default: the detailed caption) about `frames`."""
        from ..data.synthetic import CAPTION_QUESTION, question_text

        return VideoPrompt(frames=frames, prompt=question_text(question or CAPTION_QUESTION))

    def world_prompt(self, seed: int, num_frames: int, question: str | None = None) -> VideoPrompt:
        """A prompt over the synthetic world `seed` rendered at `num_frames` frames."""
        from ..data.synthetic import VideoWorld

        return self.make_prompt(VideoWorld(seed).render(num_frames), question)

    # -- input preparation -------------------------------------------------------------
    def _prompt_ids(self, i: int, prompt: VideoPrompt) -> Tensor:
        if prompt.prompt_ids is not None:
            ids = torch.as_tensor(prompt.prompt_ids).reshape(-1).long()
            if ids.numel() == 0:
                raise ValueError(f"prompts[{i}].prompt_ids is empty")
            if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                raise ValueError(f"prompts[{i}].prompt_ids must lie in [0, {self.vocab_size}), "
                                 f"got [{int(ids.min())}, {int(ids.max())}]")
            return ids
        if prompt.prompt is None:
            raise ValueError(f"prompts[{i}] has neither prompt nor prompt_ids")
        if self.tokenizer is None:
            raise ValueError("this TinyVLMTarget has no tokenizer: pass prompt_ids instead of prompt text")
        text = prompt.prompt.replace("<video>", " ")
        return torch.tensor(self.tokenizer.encode(text, add_bos=True), dtype=torch.long)

    def _frames(self, i: int, frames) -> Tensor:
        """Validate and convert to float [T, S, S, 3] in [0, 1] at the model's resolution."""
        name = f"prompts[{i}].frames"
        if not isinstance(frames, torch.Tensor):
            raise ValueError(f"{name} must be a tensor [T, H, W, 3], got {type(frames).__name__}")
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1 or min(frames.shape[1:3]) < 1:
            raise ValueError(f"{name} must have shape [T, H, W, 3] with T >= 1, got {list(frames.shape)}")
        if frames.dtype == torch.uint8:
            x = frames.to(self.device, torch.float32) / 255.0
        elif frames.is_floating_point():
            x = frames.to(self.device, torch.float32)
        else:
            raise ValueError(f"{name} must be uint8 or float in [0, 1], got {frames.dtype}")
        S = self.config.frame_size
        if x.shape[1] != S or x.shape[2] != S:
            x = F.interpolate(x.permute(0, 3, 1, 2), size=(S, S), mode="bilinear", antialias=True,
                              align_corners=False).permute(0, 2, 3, 1).clamp(0, 1)
        return x

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        layers = [int(l) for l in layers]
        bad = [l for l in layers if not 0 <= l <= self.num_layers]
        if bad:
            raise ValueError(f"layers must lie in [0, {self.num_layers}] (0 = embeddings), got {bad}")
        return layers

    def _check_memory(self, batch: int, capacity: int) -> None:
        cfg = self.config
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * batch
        try:
            budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            return
        if per_token * capacity > budget:
            fit = budget // per_token
            raise ValueError(f"a KV cache of capacity {capacity} x batch {batch} needs "
                             f"{per_token * capacity / 2**30:.1f} GiB, over half of this machine's memory; "
                             f"at most {fit} tokens per row (~{fit // cfg.patches_per_frame} frames) fit")

    # -- the Target protocol -----------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[VideoPrompt], layers: Sequence[int], capacity: int) -> PrefillOutput:
        cfg = self.config
        if len(prompts) == 0:
            raise ValueError("prompts must hold at least one VideoPrompt")
        layers = self._check_layers(layers)
        frames = [self._frames(i, p.frames) for i, p in enumerate(prompts)]
        text_ids = [self._prompt_ids(i, p) for i, p in enumerate(prompts)]
        n_visual = [self.visual_tokens_for(f.shape[0]) for f in frames]
        lengths = torch.tensor([nv + len(t) for nv, t in zip(n_visual, text_ids)], dtype=torch.long)
        too_long = [i for i, n in enumerate(lengths.tolist()) if n + 1 > capacity]
        if too_long:
            i = too_long[0]
            raise ValueError(f"prompt {i} needs {int(lengths[i])} tokens ({n_visual[i]} visual + "
                             f"{len(text_ids[i])} text) plus one to decode, over capacity={capacity}")
        B, T = len(prompts), int(lengths.max())
        self._check_memory(B, capacity)

        x = torch.zeros(B, T, cfg.hidden_size, device=self.device)               # [B, T, d]
        positions = torch.zeros(B, T, device=self.device)                        # [B, T]
        input_ids = torch.full((B, T), cfg.pad_token_id, dtype=torch.long, device=self.device)
        text_mask = torch.zeros(B, T, dtype=torch.bool, device=self.device)
        for b in range(B):
            nv, ids = n_visual[b], text_ids[b].to(self.device)
            times = self.model.frame_times(frames[b].shape[0], self.device)
            x[b, :nv] = self.model.vision(frames[b][None], times)[0]
            x[b, nv:nv + len(ids)] = self.model.embed(ids)
            positions[b, :nv] = (times * cfg.visual_rope_span).repeat_interleave(cfg.patches_per_frame)
            positions[b, nv:] = cfg.text_position_start + torch.arange(T - nv, device=self.device)
            input_ids[b, :nv] = cfg.video_token_id
            input_ids[b, nv:nv + len(ids)] = ids
            text_mask[b, nv:nv + len(ids)] = True

        # zeros, not empty: masked slots still enter SDPA's weighted sum (0 * NaN garbage = NaN)
        kv = torch.zeros(2 * cfg.num_layers, B, cfg.num_kv_heads, capacity, cfg.head_dim, device=self.device)
        lengths = lengths.to(self.device)
        n_visual_t = torch.tensor(n_visual, dtype=torch.long, device=self.device)
        visual_bias = torch.tensor([cfg.visual_bias(f.shape[0]) for f in frames], device=self.device)
        text_queries = None
        if bool((visual_bias != 0).any()):
            Lt = int((lengths - n_visual_t).max())
            query_index = (n_visual_t[:, None] + torch.arange(Lt, device=self.device)).clamp(max=T - 1)
            text_queries = (query_index, lengths, n_visual_t, visual_bias)
        out, collected = self.model.causal_forward(x, positions, layers, kv, text_queries)
        last = out[torch.arange(B, device=self.device), lengths - 1]              # [B, d]
        logits = self._head(last)                                                # [B, V]
        valid = (torch.arange(T, device=self.device)[None] < lengths[:, None])[..., None]
        hidden = [collected[l] * valid for l in layers]
        offset = cfg.text_position_start - torch.tensor(n_visual, dtype=torch.float32, device=self.device)
        state = TinyVLMState(lengths=lengths.clone(), capacity=capacity, kv=kv, position_offset=offset,
                             n_visual=n_visual_t, visual_bias=visual_bias)
        return PrefillOutput(state=state, logits=logits, hidden=hidden, input_ids=input_ids,
                             text_mask=text_mask, lengths=lengths)

    @torch.inference_mode()
    def forward_tree(self, state: TinyVLMState, tokens: Tensor, tree_mask: Tensor, depth: Tensor,
                     layers: Sequence[int]) -> TreeOutput:
        cfg = self.config
        B = state.lengths.shape[0]
        check_tensor("TinyVLMTarget", "tokens", tokens, (B, None), (torch.long,), self.device)
        N = tokens.shape[1]
        check_tensor("TinyVLMTarget", "tree_mask", tree_mask, (B, N, N), (torch.bool,), self.device)
        check_tensor("TinyVLMTarget", "depth", depth, (B, N), (torch.long,), self.device)
        layers = self._check_layers(layers)
        if N < 1:
            raise ValueError("tokens must hold at least one node per row, got N = 0")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        if bool((state.lengths + N > state.capacity).any()):
            raise ValueError(f"forward_tree: {N} nodes after lengths {state.lengths.tolist()} exceed "
                             f"capacity={state.capacity}")

        lengths = state.lengths
        node = torch.arange(N, device=self.device)
        slots = lengths[:, None] + node                                           # [B, N]
        positions = (lengths.float() + state.position_offset)[:, None] + depth.float()
        keys = _TreeKeys(state, tree_mask, cfg.num_heads // cfg.num_kv_heads)

        x = self.model.embed(tokens)                                              # [B, N, d]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        rows = torch.arange(B, device=self.device)[:, None].expand(B, N)
        collected = {0: x} if 0 in layers else {}
        kv = state.kv
        for i, layer in enumerate(self.model.layers):
            q, k, v = layer.qkv_heads(x, cos, sin)
            kv[2 * i][rows, :, slots] = k.transpose(1, 2)                        # [B, N, Hkv, D]
            kv[2 * i + 1][rows, :, slots] = v.transpose(1, 2)
            attn = keys.attend(q, kv[2 * i], kv[2 * i + 1])
            x = layer.finish(x, attn)
            if i + 1 in layers:
                collected[i + 1] = x
        state.tree_size = N
        return TreeOutput(logits=self._head(x), hidden=[collected[l] for l in layers])

    @torch.inference_mode()
    def commit(self, state: TinyVLMState, accept_index: Tensor, accept_len: Tensor) -> None:
        B = state.lengths.shape[0]
        check_tensor("TinyVLMTarget", "accept_index", accept_index, (B, None), (torch.long,), self.device)
        check_tensor("TinyVLMTarget", "accept_len", accept_len, (B,), (torch.long,), self.device)
        A = accept_index.shape[1]
        if bool((accept_len < 0).any()) or bool((accept_len > A).any()):
            raise ValueError(f"accept_len must lie in [0, {A}], got {accept_len.tolist()}")
        used = torch.arange(A, device=self.device)[None] < accept_len[:, None]
        if bool((accept_index[used] >= state.tree_size).any()) or bool((accept_index[used] < 0).any()):
            raise ValueError(f"accept_index must index the {state.tree_size} nodes of the last forward_tree")
        kv_compact(state.kv, state.lengths, accept_index, accept_len)
        state.lengths += accept_len
        state.tree_size = 0

    # -- plain decoding ----------------------------------------------------------------
    def generate_greedy(self, prompts: Sequence[VideoPrompt], max_new_tokens: int,
                        capacity: int | None = None) -> list[list[int]]:
        """Plain autoregressive greedy decoding (decoding.autoregressive_generate). Returns per
        row the generated ids, ending with EOS if it was produced."""
        return autoregressive_generate(self, prompts, max_new_tokens, capacity=capacity).tokens

    def answer(self, frames: Tensor, question: str | None = None, max_new_tokens: int = 64) -> str:
        """Greedy text answer (default question: the detailed caption)."""
        ids = self.generate_greedy([self.make_prompt(frames, question)], max_new_tokens)[0]
        return self.tokenizer.decode(ids)
