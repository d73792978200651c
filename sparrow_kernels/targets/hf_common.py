"""Shared machinery of the stock-HF video LLM targets (Qwen2.5-VL, LLaVA-OneVision).

Implements the `Target` protocol around an unmodified transformers model: per-row prefill,
tree verification with explicit positions and either the tree's structure (the "sparrow"
attention implementation, targets/hf_attention.py) or a 4-D float attention mask, a KV cache
whose layers write new slots in place (`SlotLayer`), compaction of it with
`sparrow_kernels.ops.kv_compact`, and hidden-state capture with forward hooks. It must not copy
or patch any modeling code, and never download.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from sparrow_kernels import ops
from sparrow_kernels.targets.base import PrefillOutput, TargetState, TreeOutput, VideoPrompt
from sparrow_kernels.targets.decoding import autoregressive_generate
from sparrow_kernels.targets.hf_attention import NAME as SPARROW_ATTENTION
from sparrow_kernels.targets.hf_attention import tree_mask_structure

# the adapters' default `attn_implementation`: torch.ops.sparrow.window_attn for decode and tree
# verification, SDPA for prefill and the vision towers (docs/hf_attention.md)
DEFAULT_ATTN_IMPLEMENTATION = SPARROW_ATTENTION

WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


# ----------------------------------------------------------------------------- cache helpers
def cache_kwarg_name(model: nn.Module) -> str:
    """The forward kwarg that takes the KV cache: `cache` (transformers >= 5.2x) or
    `past_key_values` (older, e.g. 5.17). The new name is preferred where both exist."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def slot_headroom(slots: int) -> int:
    """Free slots a `SlotLayer` keeps past `slots` when it (re)allocates: a quarter, at least 256."""
    return max(256, slots // 4)


class SlotLayer(DynamicLayer):
    """A transformers `DynamicLayer` whose `keys` / `values` are views of the first S slots of
    `[B, Hkv, capacity, D]` buffers. `update` writes the new slots in place, where the stock layer
    concatenates (copies) the whole cache on every forward; a full buffer grows by
    `slot_headroom`. Truncating is re-slicing `keys` / `values` (the next update writes after
    them), and `kv_compact` runs on the contiguous buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.key_buffer = self.value_buffer = None
        self._allocate(keys, values, max(capacity, keys.shape[-2]))

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        batch, heads, slots, head_dim = keys.shape
        key_buffer = keys.new_empty(batch, heads, capacity, head_dim)  # [B, Hkv, capacity, D]
        value_buffer = values.new_empty(batch, heads, capacity, values.shape[-1])
        key_buffer[..., :slots, :] = keys
        value_buffer[..., :slots, :] = values
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.keys, self.values = key_buffer[..., :slots, :], value_buffer[..., :slots, :]

    @property
    def capacity(self) -> int:
        return self.key_buffer.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.capacity:
            self._allocate(self.keys, self.values, end + slot_headroom(end))
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values


def new_dynamic_cache(layer_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                      capacity: int | None = None):
    """A transformers `DynamicCache` of plain (non-sliding) layers; pre-filled with `(keys,
    values)` per layer, each `[B, Hkv, S, D]`, its layers are `SlotLayer`s of `capacity` slots
    (default: S + `slot_headroom(S)`)."""
    from transformers import DynamicCache  # noqa: PLC0415

    if layer_kv is None:
        return DynamicCache()
    layer_kv = list(layer_kv)
    cache = DynamicCache(ddp_cache_data=layer_kv)
    for index, (keys, values) in enumerate(layer_kv):
        slots = keys.shape[-2]
        cache.layers[index] = SlotLayer(keys, values, capacity or slots + slot_headroom(slots))
    return cache


def cache_layer_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer `(keys, values)`, each `[B, Hkv, S, D]`, of a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def truncate_cache(cache, slot_count: int) -> None:
    """Keep the first `slot_count` slots of every layer (a view; the next forward re-allocates)."""
    for layer in cache.layers:
        if layer.keys.shape[-2] != slot_count:
            layer.keys = layer.keys[..., :slot_count, :]
            layer.values = layer.values[..., :slot_count, :]


def merge_row_caches(row_caches: Sequence, row_lengths: Sequence[int], capacity: int | None = None):
    """One batched cache of `SlotLayer`s (`capacity` slots) from B single-row caches of different
    lengths: right-padded with zeros to the longest row (the padded slots are masked out by every
    later forward)."""
    slot_count = max(row_lengths)
    merged = []
    for layer_idx in range(len(row_caches[0].layers)):
        keys, values = [], []
        for cache, length in zip(row_caches, row_lengths):
            k, v = cache.layers[layer_idx].keys, cache.layers[layer_idx].values  # [1, Hkv, length, D]
            pad = slot_count - length
            keys.append(nn.functional.pad(k, (0, 0, 0, pad)))
            values.append(nn.functional.pad(v, (0, 0, 0, pad)))
        merged.append((torch.cat(keys, 0), torch.cat(values, 0)))  # [B, Hkv, slot_count, D]
    return new_dynamic_cache(merged, capacity)


def compact_cache(cache, lengths: torch.Tensor, tree_start: int, accept_index: torch.Tensor,
                  accept_len: torch.Tensor) -> int:
    """Commit the accepted tree nodes of every row into the slots right after its prefix.

    The cache holds `tree_start` committed slots per row (row b uses the first `lengths[b]`;
    the rest is padding) followed by the tree nodes, node i at slot `tree_start + i` for all
    rows (transformers appends at the end). Row b's accepted node `accept_index[b, i]` moves
    to slot `lengths[b] + i`: that is `kv_compact` with `prefix_len = lengths` and the node
    indices shifted by `tree_start - lengths[b]`. Each layer's keys and values tensor
    `[B, H, S, D]` is passed to the op as a `[1, B, H, S, D]` view (in place, no copy):
    stacking all layers into one `[2L, B, H, S, D]` tensor would copy the whole cache every
    step, while the per-layer calls move only the accepted entries (on a `SlotLayer`, its
    contiguous buffers). Returns the new slot count (the longest row) after truncating the
    dropped tree slots.
    """
    shift = (tree_start - lengths).unsqueeze(1)  # [B, 1]
    src_index = torch.where(accept_index >= 0, accept_index + shift, accept_index)  # [B, A]
    new_slot_count = int((lengths + accept_len).max())
    for layer in cache.layers:
        for name, buffer_name in (("keys", "key_buffer"), ("values", "value_buffer")):
            tensor = getattr(layer, buffer_name, None)
            if tensor is None:  # a stock layer: its own tensor (copied if it is a view)
                tensor = getattr(layer, name)
                tensor = tensor if tensor.is_contiguous() else tensor.contiguous()
            ops.kv_compact(tensor.unsqueeze(0), lengths, src_index, accept_len)  # [1, B, H, S, D]
            setattr(layer, name, tensor[..., :new_slot_count, :])
    return new_slot_count


# ----------------------------------------------------------------------------- masks
def tree_attention_mask(lengths: torch.Tensor, slot_count: int, tree_mask: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """The 4-D float mask `[B, 1, N, slot_count + N]` for a tree forward: 0 where visible,
    `finfo(dtype).min` where masked. Row b's committed slots `< lengths[b]` are visible to
    every node, its padding slots `[lengths[b], slot_count)` to none, and node i sees node j
    iff `tree_mask[b, i, j]`. Float, not bool: eager attention adds the mask to the scores."""
    batch, nodes = tree_mask.shape[:2]
    device = tree_mask.device
    prefix_visible = torch.arange(slot_count, device=device)[None, :] < lengths[:, None]  # [B, S]
    visible = torch.cat([prefix_visible[:, None, :].expand(batch, nodes, slot_count), tree_mask], dim=2)
    mask = torch.zeros(batch, 1, nodes, slot_count + nodes, dtype=dtype, device=device)  # [B, 1, N, S+N]
    return mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)


# ----------------------------------------------------------------------------- hidden states
@contextlib.contextmanager
def capture_hidden(decoder_layers: nn.ModuleList, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record hidden states by layer number during the enclosed forward (forward hooks on
    the stock decoder layers, removed on exit). Layer 0 is the input of the first decoder
    layer (token + visual embeddings), layer l the output of decoder layer l - 1, so layer
    `len(decoder_layers)` is the last hidden state *before* the final norm."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    wanted = sorted(set(int(layer) for layer in layers))

    def first_input(_module, args, kwargs):
        captured[0] = args[0] if args else kwargs["hidden_states"]

    def output_of(number):
        def hook(_module, _args, output):
            captured[number] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    try:
        for number in wanted:
            if number == 0:
                handles.append(decoder_layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
            else:
                handles.append(decoder_layers[number - 1].register_forward_hook(output_of(number)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    layers = [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if bad:
        raise ValueError(f"layers: each must be in [0, {num_layers}] (0 = embeddings, {num_layers} = last "
                         f"decoder layer), got {bad}")
    return layers


# ----------------------------------------------------------------------------- inputs
def check_frames(frames: torch.Tensor, row: int) -> torch.Tensor:
    """Frames as float `[T, 3, H, W]` in [0, 1] from uint8 or float `[T, H, W, 3]` RGB."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"prompts[{row}].frames must have shape [T, H, W, 3] (RGB, T >= 1), got {got}")
    if frames.dtype == torch.uint8:
        pixels = frames.float() / 255.0
    elif frames.is_floating_point():
        pixels = frames.float()
    else:
        raise ValueError(f"prompts[{row}].frames must be uint8 or float in [0, 1], got {frames.dtype}")
    return pixels.permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W]


def resize_normalize(pixels: torch.Tensor, height: int, width: int, mean: Sequence[float],
                     std: Sequence[float]) -> torch.Tensor:
    """Bicubic resize of `[T, 3, H, W]` in [0, 1] to `[T, 3, height, width]`, clamp to [0, 1], then
    `(x - mean) / std` per channel. The small stand-in for the HF processors used when a
    checkpoint ships none (tiny random models); real checkpoints use their own processor."""
    if pixels.shape[-2:] != (height, width):
        pixels = nn.functional.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False)
        pixels = pixels.clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def chat_text(processor, prompt: VideoPrompt, row: int) -> str:
    """The model's chat prompt for one user turn (the video, then the text) via the processor's
    chat template. `prompt.prompt` is the text; without it, `prompt_ids` are decoded to text."""
    text = prompt.prompt
    if text is None and prompt.prompt_ids is not None:
        ids = torch.as_tensor(prompt.prompt_ids).reshape(-1).tolist()
        text = processor.tokenizer.decode(ids, skip_special_tokens=True)
    if text is None:
        raise ValueError(f"prompts[{row}].prompt (text) or prompt_ids is required")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU (the checkpoints' own dtype), float32 on a CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def check_text_ids(prompt_ids, row: int, forbidden: dict[str, int]) -> list[int]:
    ids = torch.as_tensor(prompt_ids).reshape(-1).tolist() if prompt_ids is not None else []
    for name, token in forbidden.items():
        if token in ids:
            raise ValueError(f"prompts[{row}].prompt_ids must be text only (the adapter inserts the video "
                             f"placeholders itself), but it contains the {name} id {token}")
    return ids


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_files(directory: Path) -> list[Path]:
    return [p for pattern in WEIGHT_FILE_PATTERNS for p in sorted(directory.glob(pattern))]


def require_weights(directory: Path) -> None:
    if not checkpoint_files(directory):
        raise FileNotFoundError(f"{directory}: no model weights found (expected *.safetensors or "
                                f"pytorch_model*.bin next to config.json); nothing is downloaded")


def has_processor(directory: Path) -> bool:
    return any((directory / name).is_file() for name in PROCESSOR_FILES)


# ----------------------------------------------------------------------------- the adapter base
@dataclass
class HFTargetState(TargetState):
    """Decoding state of an HF target. `cache`: the transformers cache, `[B, Hkv, slot_count, D]`
    per layer, row b valid below `lengths[b]`; `first_position [P, B]`: the position (P = 3 M-RoPE
    rows for Qwen, 1 for LLaVA) of the first generated token, exactly as `generate()` assigns it;
    `prompt_lengths [B]`; `tree_nodes`: node count of the uncommitted tree forward, or None."""

    cache: object = None
    first_position: torch.Tensor | None = None
    prompt_lengths: torch.Tensor | None = None
    slot_count: int = 0
    tree_nodes: int | None = None


@dataclass
class RowInputs:
    """One prompt ready for the model: `model_kwargs` (input_ids [1, T], pixel values, grids...),
    `positions [P, T]` of its tokens and `text_mask [T]`."""

    model_kwargs: dict
    positions: torch.Tensor
    text_mask: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return self.model_kwargs["input_ids"]


class HFVideoTarget:
    """Base of the HF adapters. Subclasses supply the model's inputs for one prompt
    (`_processor_inputs` / `_direct_inputs`), its positions (`_row_positions`) and
    `_model_positions(positions [P, B, N])` (the `position_ids` the stock model takes). Batch > 1 is exact: each row is prefilled alone, the caches are merged with
    right padding, and every later forward masks each row's padding and uses its own positions."""

    position_rows = 1

    def __init__(self, model: nn.Module, processor=None, eos_token_ids: Sequence[int] | None = None):
        self.model = model.eval()
        self.processor = processor
        text_config = model.config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise NotImplementedError(f"{type(model).__name__}: sliding-window layers ({sorted(set(layer_types))}) "
                                      f"are not supported by the tree mask; use a config with "
                                      f"use_sliding_window=False")
        self.num_layers = int(text_config.num_hidden_layers)
        self.hidden_size = int(text_config.hidden_size)
        self.vocab_size = int(text_config.vocab_size)
        if eos_token_ids is None:
            eos_token_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            if eos_token_ids is None:
                eos_token_ids = getattr(text_config, "eos_token_id", None)
        if eos_token_ids is None:
            eos_token_ids = []
        elif isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self._cache_kwarg = cache_kwarg_name(model)

    # --------------------------------------------------------------- model parts
    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (from its processor), or None for processor-less models."""
        return getattr(self.processor, "tokenizer", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def lm_head(self) -> nn.Module:
        """Final norm + LM head, `[.., H] -> [.., V]` (applied to layer `num_layers` hidden states)."""
        return nn.Sequential(self.model.model.language_model.norm, self.model.lm_head)

    # --------------------------------------------------------------- inputs
    def _row_inputs(self, prompt: VideoPrompt, row: int) -> RowInputs:
        """One prompt -> the stock model's keyword inputs on this device, its positions and
        which positions are text (through the checkpoint's processor when there is one)."""
        if not isinstance(prompt, VideoPrompt):
            raise ValueError(f"prompts[{row}] must be a VideoPrompt, got {type(prompt).__name__}")
        pixels = check_frames(prompt.frames, row)  # [T, 3, H, W] in [0, 1]
        kwargs = self._processor_inputs(prompt, pixels, row) if self.processor is not None \
            else self._direct_inputs(prompt, pixels, row)
        device = self.device
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        kwargs["pixel_values_videos"] = kwargs["pixel_values_videos"].to(self.dtype)
        input_ids = kwargs["input_ids"]
        is_video = input_ids[0] == self.video_token_id
        if not bool(is_video.any()):
            raise ValueError(f"prompts[{row}]: the processed prompt has no video placeholder token "
                             f"({self.video_token_id})")
        positions = self._row_positions(kwargs, is_video)
        text_mask = ~(is_video | (input_ids[0] == self.image_token_id))
        return RowInputs(model_kwargs=kwargs, positions=positions, text_mask=text_mask)

    def prompt_lengths(self, prompts: Sequence[VideoPrompt]) -> list[int]:
        """Tokens each prompt occupies after prefill (video placeholders + text), from the
        preprocessing alone (no model forward); the engine sizes the KV cache from this."""
        return [int(self._row_inputs(p, i).input_ids.shape[1]) for i, p in enumerate(prompts)]

    # --------------------------------------------------------------- subclass hooks
    video_token_id: int
    image_token_id: int

    def _processor_inputs(self, prompt: VideoPrompt, pixels: torch.Tensor, row: int) -> dict:
        raise NotImplementedError

    def _direct_inputs(self, prompt: VideoPrompt, pixels: torch.Tensor, row: int) -> dict:
        raise NotImplementedError

    def _row_positions(self, kwargs: dict, is_video: torch.Tensor) -> torch.Tensor:
        """Positions `[P, T]` of one prompt (P = position_rows); may add model inputs to kwargs."""
        raise NotImplementedError

    def _model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --------------------------------------------------------------- Target protocol
    @torch.no_grad()
    def prefill(self, prompts: Sequence[VideoPrompt], layers: Sequence[int], capacity: int) -> PrefillOutput:
        if isinstance(prompts, VideoPrompt) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty sequence of VideoPrompt")
        layers = check_layers(layers, self.num_layers)
        rows = [self._row_inputs(prompt, row) for row, prompt in enumerate(prompts)]
        prompt_lengths = [row.input_ids.shape[1] for row in rows]
        for row, length in enumerate(prompt_lengths):
            if length + 1 > capacity:
                raise ValueError(f"prompts[{row}] has {length} tokens "
                                 f"({int((~rows[row].text_mask).sum())} visual); capacity={capacity} "
                                 f"must be at least {length + 1} (the prompt plus one generated token)")
        batch, longest, device = len(rows), max(prompt_lengths), self.device
        hidden = [torch.zeros(batch, longest, self.hidden_size, dtype=self.dtype, device=device) for _ in layers]
        input_ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
        text_mask = torch.zeros(batch, longest, dtype=torch.bool, device=device)
        first_position = torch.zeros(self.position_rows, batch, dtype=torch.long, device=device)  # [P, B]
        logits, caches = [], []
        for b, row in enumerate(rows):
            cache = new_dynamic_cache()
            positions = row.positions.to(device)  # [P, T]
            with capture_hidden(self.decoder_layers, layers) as captured:
                out = self.model(**row.model_kwargs, position_ids=self._model_positions(positions[:, None, :]),
                                 use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
            logits.append(out.logits[:, -1])  # [1, V]
            for slot, layer in enumerate(layers):
                hidden[slot][b, :prompt_lengths[b]] = captured[layer][0]
            input_ids[b, :prompt_lengths[b]] = row.input_ids[0]
            text_mask[b, :prompt_lengths[b]] = row.text_mask.to(device)
            # generate() continues each M-RoPE row from the prompt's last position + 1
            first_position[:, b] = positions[:, -1] + 1
            caches.append(cache)
        # one right-padded cache of in-place slots: no whole-cache copy per later forward
        cache = merge_row_caches(caches, prompt_lengths, min(int(capacity), longest + slot_headroom(longest)))
        lengths = torch.tensor(prompt_lengths, dtype=torch.long, device=device)
        state = HFTargetState(lengths=lengths.clone(), capacity=int(capacity), cache=cache,
                              first_position=first_position, prompt_lengths=lengths.clone(),
                              slot_count=longest)
        return PrefillOutput(state=state, logits=torch.cat(logits, 0), hidden=hidden, input_ids=input_ids,
                             text_mask=text_mask, lengths=lengths)

    @torch.no_grad()
    def forward_tree(self, state: HFTargetState, tokens: torch.Tensor, tree_mask: torch.Tensor,
                     depth: torch.Tensor, layers: Sequence[int]) -> TreeOutput:
        self._check_state(state)
        batch, device = state.lengths.shape[0], self.device
        if tokens.ndim != 2 or tokens.shape[0] != batch or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be int64 [B, N] with B = {batch}, got {tokens.dtype} {tuple(tokens.shape)}")
        nodes = tokens.shape[1]
        if nodes < 1:
            raise ValueError("tokens must hold at least one node (the root) per row")
        if tree_mask.shape != (batch, nodes, nodes) or tree_mask.dtype != torch.bool:
            raise ValueError(f"tree_mask must be bool [B, N, N] = [{batch}, {nodes}, {nodes}], "
                             f"got {tree_mask.dtype} {tuple(tree_mask.shape)}")
        if depth.shape != (batch, nodes) or depth.dtype != torch.long:
            raise ValueError(f"depth must be int64 [B, N] = [{batch}, {nodes}], got {depth.dtype} {tuple(depth.shape)}")
        for name, tensor in (("tokens", tokens), ("tree_mask", tree_mask), ("depth", depth)):
            if tensor.device != device:
                raise ValueError(f"{name} must be on the target's device {device}, got {tensor.device}")
        if not bool(tree_mask.diagonal(dim1=1, dim2=2).all()):
            raise ValueError("tree_mask: every node must see itself (tree_mask[b, i, i] = True)")
        over = state.lengths + nodes > state.capacity
        if bool(over.any()):
            row = int(over.nonzero()[0])
            raise ValueError(f"forward_tree: row {row} holds {int(state.lengths[row])} tokens; {nodes} more "
                             f"exceed capacity={state.capacity}")
        layers = check_layers(layers, self.num_layers)
        # drop the slots of an earlier, uncommitted tree
        truncate_cache(state.cache, state.slot_count)
        mask = self._tree_mask(state, tree_mask)
        generated = state.lengths - state.prompt_lengths  # [B]
        positions = state.first_position[:, :, None] + generated[None, :, None] + depth[None]  # [P, B, N]
        with capture_hidden(self.decoder_layers, layers) as captured:
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=self._model_positions(positions),
                             use_cache=True, **{self._cache_kwarg: state.cache})
        state.tree_nodes = nodes
        return TreeOutput(logits=out.logits, hidden=[captured[layer] for layer in layers])

    @torch.no_grad()
    def commit(self, state: HFTargetState, accept_index: torch.Tensor, accept_len: torch.Tensor) -> None:
        self._check_state(state)
        if state.tree_nodes is None:
            raise ValueError("commit: no uncommitted forward_tree to take nodes from")
        batch, nodes = state.lengths.shape[0], state.tree_nodes
        if accept_index.ndim != 2 or accept_index.shape[0] != batch or accept_index.dtype != torch.long:
            raise ValueError(f"accept_index must be int64 [B, A] with B = {batch}, "
                             f"got {accept_index.dtype} {tuple(accept_index.shape)}")
        if accept_len.shape != (batch,) or accept_len.dtype != torch.long:
            raise ValueError(f"accept_len must be int64 [B] = [{batch}], got {accept_len.dtype} {tuple(accept_len.shape)}")
        accept_index, accept_len = accept_index.to(self.device), accept_len.to(self.device)
        if bool(((accept_len < 0) | (accept_len > min(accept_index.shape[1], nodes))).any()):
            raise ValueError(f"accept_len must be in [0, min(A, N)] = [0, {min(accept_index.shape[1], nodes)}], "
                             f"got {accept_len.tolist()}")
        used = torch.arange(accept_index.shape[1], device=self.device)[None, :] < accept_len[:, None]
        if bool(((accept_index < 0) | (accept_index >= nodes))[used].any()):
            raise ValueError(f"accept_index: the first accept_len[b] entries must be node indices in [0, {nodes})")
        state.slot_count = compact_cache(state.cache, state.lengths, state.slot_count, accept_index, accept_len)
        state.lengths += accept_len
        state.tree_nodes = None

    def _tree_mask(self, state: HFTargetState, tree_mask: torch.Tensor):
        """The `attention_mask` of a tree forward: under "sparrow" attention the structure itself
        (lengths, positions, tree mask; one per layer type, as the stock text models accept a
        prepared mapping), else the 4-D float mask `[B, 1, N, S+N]`."""
        text_config = self.model.config.get_text_config(decoder=True)
        if text_config._attn_implementation == SPARROW_ATTENTION:
            structure = tree_mask_structure(state.lengths, state.slot_count, tree_mask)
            layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
            return {layer_type: structure for layer_type in set(layer_types)}
        return tree_attention_mask(state.lengths, state.slot_count, tree_mask, self.dtype)  # [B, 1, N, S+N]

    def _check_state(self, state) -> None:
        if not isinstance(state, HFTargetState) or state.cache is None:
            raise ValueError(f"state must be the HFTargetState returned by {type(self).__name__}.prefill")

    # --------------------------------------------------------------- plain decoding
    def generate_greedy(self, prompts: Sequence[VideoPrompt], max_new_tokens: int,
                        eos_token_ids: Sequence[int] | None = None) -> list[list[int]]:
        """Plain greedy decoding through the Target interface (decoding.autoregressive_generate):
        the autoregressive baseline. A row stops after emitting an EOS id (kept in its output),
        as `generate(do_sample=False)` does."""
        # the cache grows on demand, so the capacity is only the logical bound of the interface
        return autoregressive_generate(self, prompts, max_new_tokens, eos_token_ids=eos_token_ids,
                                       capacity=UNBOUNDED_CAPACITY).tokens


UNBOUNDED_CAPACITY = 1 << 40
