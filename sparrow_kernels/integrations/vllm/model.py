"""The vLLM model class of an exported Sparrow draft (architecture `SparrowDraftEagle3`, method
"eagle3"): the target hands it its hidden states at the draft's feature layer (vLLM's aux hidden
states use the project's layer numbering: 0 = embeddings, l = output of decoder layer l-1), and it
drafts with paged_draft.draft_forward, which keeps only text positions. It owns one vLLM
attention layer solely so that vLLM allocates a paged cache and builds per-request metadata for
it; vLLM's attention kernels never run on it. Imported only by vLLM (plugin.register).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM
from vllm.model_executor.models.utils import maybe_prefix

from sparrow_kernels.integrations.vllm.paged_draft import PagedBatch, PagedStore, draft_forward, visual_rule_for
from sparrow_kernels.integrations.vllm.plugin import ARCHITECTURE, CONFIG_KEY
from sparrow_kernels.speculative.draft import DraftConfig, SparrowDraft, check_draft_vocab


class SparrowDraftBody(nn.Module):
    """What vLLM's proposer looks for under `model.model`: `embed_tokens` (replaced by the
    target's), plus the Sparrow draft, the target's final norm weight and the cache holder."""

    def __init__(self, vllm_config: VllmConfig, hf_config, prefix: str):
        super().__init__()
        meta = getattr(hf_config, CONFIG_KEY, None)
        if not isinstance(meta, dict) or "draft" not in meta:
            raise ValueError(f"{ARCHITECTURE}: the draft's config.json has no '{CONFIG_KEY}' section; "
                             "write the directory with `sparrow export-vllm`")
        self.draft_config = DraftConfig.from_dict(meta["draft"])
        cfg = self.draft_config
        self.rule = visual_rule_for(cfg, meta["placeholder_token_ids"], meta["text_after_visual_token_id"],
                                    meta["run_start_token_id"])
        self.norm_eps = float(meta["target_rms_norm_eps"])
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                   prefix=maybe_prefix(prefix, "embed_tokens"))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)   # target's final norm
        self.draft = SparrowDraft(cfg, self.embed_tokens, nn.Identity())
        target_layers = vllm_config.model_config.get_total_num_hidden_layers()
        self.attn = Attention(cfg.num_heads, cfg.head_dim, 1.0 / math.sqrt(cfg.head_dim), cfg.num_kv_heads,
                              cache_config=vllm_config.cache_config,
                              prefix=maybe_prefix(prefix, f"layers.{target_layers}.self_attn.attn"))
        self._store: PagedStore | None = None
        self._store_source: torch.Tensor | None = None     # the kv_cache tensor _store views

    def store(self) -> PagedStore | None:
        """The draft's paged store over the cache vLLM bound to `attn` (None before binding)."""
        kv = self.attn.kv_cache
        if isinstance(kv, (list, tuple)):
            kv = kv[0] if kv else None
        if kv is None or kv.numel() == 0:
            return None
        if self._store is None or self._store_source is not kv:
            self._store = PagedStore(kv, self.draft_config.num_kv_heads, self.draft_config.head_dim)
            self._store_source = kv
        return self._store


class SparrowDraftEagle3(Eagle3LlamaForCausalLM):
    """A Sparrow draft for vLLM's EAGLE-3 path (chain drafting). Subclasses Eagle3LlamaForCausalLM
    only because vLLM's proposer checks for it; none of its layers are built.

    It declares multimodal-embedding support so that the proposer hands `embed_input_ids` the
    `is_multimodal` mask of the shifted ids (which positions of the prompt are visual, from the
    prompt's placeholder ranges); the proposer then calls `forward` with those embeddings and no
    ids, so `embed_input_ids` keeps the ids and the mask for the forward that follows it."""

    supports_multimodal_embeddings = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        speculative_config = vllm_config.speculative_config
        assert speculative_config is not None, "SparrowDraftEagle3 is a speculative draft"
        self.config = speculative_config.draft_model_config.hf_config
        self.model = SparrowDraftBody(vllm_config, self.config, maybe_prefix(prefix, "model"))
        cfg = self.model.draft_config
        if len(cfg.feature_layers) != 1:
            raise ValueError(f"{ARCHITECTURE}: drafts with one feature layer only, got {cfg.feature_layers}")
        self.config.draft_vocab_size = cfg.vocab_size
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(cfg.vocab_size)
        # a draft vocabulary (EAGLE-3's draft-to-target map): its K ids and the target's LM-head rows of them
        meta = getattr(self.config, CONFIG_KEY, None)
        k = int(meta.get("draft_vocab_size", 0)) if isinstance(meta, dict) else 0
        if not 0 <= k <= cfg.vocab_size:
            raise ValueError(f"{ARCHITECTURE}: draft_vocab_size must be in [0, vocab_size={cfg.vocab_size}], got {k}")
        self.vocab: torch.Tensor | None
        self.vocab_head = nn.Parameter(torch.empty(k, cfg.hidden_size), requires_grad=False) if k else None
        self.register_buffer("vocab", torch.zeros(k, dtype=torch.int64) if k else None)
        self.draft_id_to_target_id = None
        self.has_own_embed_tokens = False     # the proposer shares the target's embedding ...
        self.has_own_lm_head = False          # ... and LM head
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None   # ids, is_multimodal

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, is_multimodal=None) -> torch.Tensor:
        """The target's token embeddings (unused by the draft); keeps `input_ids` and
        `is_multimodal` for the next forward. `multimodal_embeddings` are ignored: the draft never
        reads a visual position."""
        self._pending = (input_ids, None if is_multimodal is None else is_multimodal.to(input_ids.device))
        return self.model.embed_tokens(input_ids)

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states          # one feature layer: the draft consumes it as is

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (the target's final norm of the draft hidden: for logits, the draft hidden: fed
        back in the next chain step), `[num_tokens, H]` each. `positions` is not used: the draft
        places its entries at their text index, which vLLM's positions (M-RoPE) do not give."""
        body = self.model
        pending, self._pending = self._pending, None
        out = torch.zeros(hidden_states.shape[0], body.draft_config.hidden_size, dtype=hidden_states.dtype,
                          device=hidden_states.device)
        meta = get_forward_context().attn_metadata
        if isinstance(meta, list):
            meta = meta[0]
        if isinstance(meta, dict):
            meta = meta.get(body.attn.layer_name)
        store = body.store()
        if meta is not None and store is not None:               # not a dummy / profiling run
            n = int(getattr(meta, "num_actual_tokens", meta.query_start_loc[-1]))
            next_is_visual = None
            if input_ids is None:              # the proposer embedded them just before this call
                if pending is None or pending[0].shape[0] < n:
                    raise RuntimeError(f"{ARCHITECTURE}: forward without token ids and without a preceding "
                                       "embed_input_ids")
                input_ids, next_is_visual = pending
                next_is_visual = None if next_is_visual is None else next_is_visual[:n]
            body.draft.frozen.embed_tokens = body.embed_tokens   # the target's, once the proposer shared it
            batch = PagedBatch(meta.query_start_loc, meta.seq_lens, meta.block_table, store.block_size)
            out[:n] = draft_forward(body.draft, store, batch, input_ids[:n], hidden_states[:n], body.rule,
                                    next_is_visual).to(out.dtype)
        normed = out.float() * torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + body.norm_eps)
        return (normed * body.norm.float()).to(out.dtype), out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits over the target's vocabulary; with a draft vocabulary only its K rows are
        multiplied and every other id gets -inf (the proposer's argmax stays inside it)."""
        if self.vocab_head is None:
            return self.logits_processor(self.lm_head, hidden_states)
        small = nn.functional.linear(hidden_states.to(self.vocab_head.dtype), self.vocab_head)   # [n, K]
        logits = small.new_full((small.shape[0], self.model.draft_config.vocab_size), float("-inf"))
        logits[:, self.vocab] = small
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Exported names: `draft.<SparrowDraft state_dict name>`, `norm` (the target's final norm)
        and, with a draft vocabulary, `vocab` (its K sorted target ids) and `vocab_head` (their
        LM-head rows)."""
        params = {f"draft.{name}": p for name, p in self.model.draft.named_parameters()}
        params["norm"] = self.model.norm
        if self.vocab_head is not None:
            params["vocab_head"], params["vocab"] = self.vocab_head, self.vocab
        missing = set(params)
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"{ARCHITECTURE}: unexpected weight {name!r} in the draft checkpoint")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{ARCHITECTURE}: weight {name} has shape {list(tensor.shape)}, "
                                 f"the config asks for {list(params[name].shape)}")
            if name == "vocab":
                check_draft_vocab(tensor.to("cpu", torch.int64), self.model.draft_config.vocab_size,
                                  f"{ARCHITECTURE}: weight vocab")
            with torch.no_grad():
                params[name].copy_(tensor)
            missing.discard(name)
        if missing:
            raise ValueError(f"{ARCHITECTURE}: the draft checkpoint lacks {sorted(missing)}")
