"""One vLLM engine session for tests/integrations/test_vllm.py, run as a subprocess (one engine
per process; vLLM keeps process-wide state): greedy generation of a fixed batch of text and video
requests, without speculation (--baseline) or with the exported Sparrow draft, where it also
reruns the batch with the draft's inputs poisoned at visual positions and records the draft's
proposals and hidden states of both runs. Prints one JSON line. Test code, not a library.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine in this process: the probe is reachable

import torch  # noqa: E402

from sparrow_kernels.integrations.vllm.tiny import TEXT_PROMPT, random_video  # noqa: E402

PROBE_ARCH = "SparrowDraftProbeEagle3"


# video prompts with their question first, so that the probe tells them apart before their videos
VIDEO_AFTER_TEXT = "<|im_start|>user\n{text}\n<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"


def requests():
    texts = ["describe the video", "a red ball rolls to the left", "what happens in the video", "then it stops"]
    batch = [{"prompt": TEXT_PROMPT.format(text=texts[0])}, {"prompt": TEXT_PROMPT.format(text=texts[1])}]
    for i, (text, frames) in enumerate(zip(texts[2:], (8, 4))):
        batch.append({"prompt": VIDEO_AFTER_TEXT.format(text=text), "multi_modal_data": {"video": random_video(i, frames)}})
    return batch


# the committed world target's chat format (its chat template; with and without a system message)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
WORLD_TURN = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def world_requests():
    """Requests the world target was trained for: narration prompts about held-out world clips
    (16 frames of 112 px at the clip's own rate) and two without a video. The second video request
    has no system message, so the probe tells the two video prompts apart before their videos."""
    from sparrow_kernels.data.world import World, heldout_world_seed
    from sparrow_kernels.integrations.vllm.tiny import video_input

    batch = [{"prompt": SYSTEM + WORLD_TURN.format(content=text)}
             for text in ("Describe the video.", "How many objects are there?")]
    for i, text in enumerate(("Describe the video in detail.", "What happens in this video? Give a detailed account.")):
        world = World(heldout_world_seed(7000 + i))
        video = video_input(world.render(16, 112), 16 / world.duration)
        batch.append({"prompt": ("" if i else SYSTEM) + WORLD_TURN.format(content=VIDEO + text),
                      "multi_modal_data": {"video": video}})
    return batch


def make_probe():
    """The exported model class, plus recording and (when `poison` is set) noise in the target
    features and NaN in the draft's cache at every visual entry."""
    from vllm.forward_context import get_forward_context

    from sparrow_kernels.integrations.vllm.model import SparrowDraftEagle3

    class SparrowDraftProbeEagle3(SparrowDraftEagle3):
        poison = False
        poisoned_entries = 0
        poisoned_positions: set = set()   # (prompt, index): chain steps of a partial prefill revisit some
        hidden: list = []
        proposals: list = []

        prompts: list = []       # the batch's prompt token ids (from a clean run of the same batch)
        candidates: dict = {}    # request (its first cache block) -> indices of the prompts it may be

        def _visual_entries(self, input_ids):
            """Entries at a placeholder position of their prompt, and their slots. Kept apart from
            the code under test: each row is matched to its prompt by the shifted ids of its first
            chunk (entry j carries token j+1); prompts that share that chunk agree on it."""
            meta = get_forward_context().attn_metadata
            meta = meta[0] if isinstance(meta, list) else meta
            meta = meta.get(self.model.attn.layer_name) if isinstance(meta, dict) else meta
            if meta is None or self.model.store() is None:
                return None, None
            placeholders = set(self.model.rule.placeholder_ids)
            qsl, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
            entries, slots = [], []
            bs = self.model.store().block_size
            for r in range(len(lens)):
                key = int(meta.block_table[r, 0])
                first = lens[r] - (qsl[r + 1] - qsl[r])
                if first == 0:                            # a new request in these blocks
                    type(self).candidates[key] = list(range(len(self.prompts)))
                chunk = [int(t) for t in input_ids[qsl[r]:qsl[r + 1] - 1]]   # the last may be vLLM's backup token
                type(self).candidates[key] = [
                    p for p in type(self).candidates[key]
                    if all(first + 1 + k >= len(self.prompts[p]) or self.prompts[p][first + 1 + k] == t
                           for k, t in enumerate(chunk))]
                matches = [self.prompts[p] for p in type(self).candidates[key]]
                assert matches, "a request of the probe's batch"
                for i in range(qsl[r], qsl[r + 1]):
                    index = first + i - qsl[r]
                    visual = {index < len(ids) and ids[index] in placeholders for ids in matches}
                    assert len(visual) == 1, "the candidate prompts agree on this position"
                    if visual.pop():
                        type(self).poisoned_positions.add((tuple(type(self).candidates[key]), index))
                        entries.append(i)
                        slots.append(int(meta.block_table[r, index // bs]) * bs + index % bs)
            return torch.tensor(entries, dtype=torch.long), torch.tensor(slots, dtype=torch.long)

        def forward(self, input_ids, positions, hidden_states, inputs_embeds=None):
            ids = input_ids if input_ids is not None or self._pending is None else self._pending[0]
            entries, slots = self._visual_entries(ids) if self.poison and ids is not None else (None, None)
            if entries is not None and entries.numel():
                type(self).poisoned_entries += entries.numel()
                hidden_states = hidden_states.clone()
                hidden_states[entries] = 1e3 * torch.randn_like(hidden_states[entries])
            normed, hidden = super().forward(input_ids, positions, hidden_states, inputs_embeds)
            if slots is not None and slots.numel():
                nan = torch.full((slots.numel(), self.model.draft_config.num_kv_heads, self.model.draft_config.head_dim),
                                 float("nan"))
                self.model.store().write(slots, nan, nan)
            type(self).hidden.append(hidden.detach().clone())
            return normed, hidden

        def compute_logits(self, hidden_states):
            logits = super().compute_logits(hidden_states)
            type(self).proposals.append(logits.argmax(-1).tolist())
            return logits

    return SparrowDraftProbeEagle3


def spec_metrics(llm) -> dict:
    values = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            values[metric.name] = getattr(metric, "values", None) or getattr(metric, "value", None)
    return values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", help="an export-vllm directory; omitted: no speculation")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--token-budget", type=int, default=40, help="vLLM max_num_batched_tokens")
    parser.add_argument("--world", action="store_true", help="world-clip requests in the world target's chat format")
    args = parser.parse_args()

    from vllm import LLM, ModelRegistry, SamplingParams

    # a small token budget splits the video prompts' prefill into chunks whose edges fall inside the video
    kwargs = dict(model=args.target, dtype="float32", max_model_len=1024, enable_prefix_caching=False, seed=0,
                  gpu_memory_utilization=0.08, max_num_seqs=8, limit_mm_per_prompt={"video": 1, "image": 1},
                  disable_log_stats=False, max_num_batched_tokens=args.token_budget)
    probe = None
    if args.draft:
        probe_dir = args.draft.rstrip("/") + "_probe"
        shutil.rmtree(probe_dir, ignore_errors=True)
        shutil.copytree(args.draft, probe_dir)
        with open(os.path.join(probe_dir, "config.json")) as f:
            config = json.load(f)
        config["architectures"] = [PROBE_ARCH]
        with open(os.path.join(probe_dir, "config.json"), "w") as f:
            json.dump(config, f)
        probe = make_probe()
        ModelRegistry.register_model(PROBE_ARCH, probe)
        kwargs["speculative_config"] = {"method": "eagle3", "model": probe_dir, "num_speculative_tokens": args.k}
    start = time.time()
    llm = LLM(**kwargs)
    result = {"engine_start_s": round(time.time() - start, 1)}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    batch = world_requests() if args.world else requests()
    result["prompt_lengths"] = []
    outputs = llm.generate(batch, params, use_tqdm=False)
    result["outputs"] = [list(o.outputs[0].token_ids) for o in outputs]
    result["prompt_lengths"] = [len(o.prompt_token_ids) for o in outputs]
    if probe is not None:
        from sparrow_kernels.integrations.vllm.plugin import ARCHITECTURE

        result["plugin_registered"] = ARCHITECTURE in ModelRegistry.get_supported_archs()
        result["metrics"] = spec_metrics(llm)
        # the first batch of a session schedules differently (warm-up); compare two later, equal batches
        probe.prompts = [list(o.prompt_token_ids) for o in outputs]
        probe.hidden.clear()
        probe.proposals.clear()
        clean = llm.generate(batch, params, use_tqdm=False)
        result["outputs_again"] = [list(o.outputs[0].token_ids) for o in clean]
        clean_hidden, clean_proposals = list(probe.hidden), list(probe.proposals)
        probe.hidden.clear()
        probe.proposals.clear()
        probe.poison = True
        poisoned = llm.generate(batch, params, use_tqdm=False)
        result["outputs_poisoned"] = [list(o.outputs[0].token_ids) for o in poisoned]
        result["draft_calls"] = [len(clean_hidden), len(probe.hidden)]
        result["max_entries_per_forward"] = max(h.shape[0] for h in clean_hidden)
        result["poisoned_entries"] = probe.poisoned_entries
        result["poisoned_positions"] = len(probe.poisoned_positions)
        placeholders = set(config["sparrow"]["placeholder_token_ids"])
        result["visual_tokens"] = sum(t in placeholders for o in outputs for t in o.prompt_token_ids)
        result["proposals_equal"] = clean_proposals == probe.proposals
        result["hidden_equal"] = len(clean_hidden) == len(probe.hidden) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(clean_hidden, probe.hidden))
        result["hidden_finite"] = all(bool(torch.isfinite(h).all()) for h in probe.hidden)
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)   # skip vLLM's teardown (slow, and irrelevant to the result)


if __name__ == "__main__":
    main()
