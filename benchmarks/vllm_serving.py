"""vLLM serving with Sparrow drafts: acceptance (vLLM's spec-decode counters: mean accepted length
= 1 + accepted / drafts), per-request latency and total output throughput at several
concurrencies, for no speculation, the Sparrow draft and a visual-KV draft (EAGLE-style, sees the
visual tokens), each exported with `sparrow export-vllm`. One engine per configuration, each in
its own process. Greedy, video requests, `ignore_eos` so every request decodes --max-tokens.
The videos are held-out clips of the narrated world (data/world.py, seeds 7000 + i, rendered at
--size pixels with the frame rate their sampling implies), the prompt the target's own chat
template around --prompt; --quick uses random pixels.

  python benchmarks/vllm_serving.py --target sparrow_kernels/checkpoints/qwen2_5_vl_world \
      --sparrow EXPORTED --visual-kv EXPORTED --concurrency 1 4 16 --max-tokens 128 --frames 64 --size 112 \
      --json results/vllm_serving.json
  python benchmarks/vllm_serving.py --quick    # smoke: tiny random Qwen2.5-VL and random drafts

Run it in the vLLM venv (docs/serving.md) on a quiet machine; timings are wall clock.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def spec_counters(llm) -> dict:
    """vLLM's cumulative spec-decode counters (drafts, draft tokens, accepted tokens)."""
    values = {}
    for metric in llm.get_metrics():
        if metric.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                           "vllm:spec_decode_num_accepted_tokens"):
            value = getattr(metric, "value", None)
            values[metric.name.split(":")[1]] = value if value is not None else sum(metric.values)
    return values


def worker(args) -> None:
    """One engine: every concurrency level in turn; prints one RESULT line."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from sparrow_kernels.integrations.vllm.tiny import VIDEO_PROMPT, random_video, video_input

    kwargs = dict(model=args.target, dtype=args.dtype, max_model_len=args.max_model_len, enable_prefix_caching=False,
                  seed=0, gpu_memory_utilization=args.memory_fraction, max_num_seqs=max(args.concurrency),
                  limit_mm_per_prompt={"video": 1, "image": 0}, disable_log_stats=False)
    if args.draft:
        kwargs["speculative_config"] = {"method": "eagle3", "model": args.draft, "num_speculative_tokens": args.k}
    start = time.perf_counter()
    llm = LLM(**kwargs)
    result = {"engine_start_s": round(time.perf_counter() - start, 1), "levels": []}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    tokenizer = llm.get_tokenizer()
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": args.prompt}]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = VIDEO_PROMPT.format(text=args.prompt)

    def request(seed: int) -> dict:
        if args.random_video:
            video = random_video(seed, args.frames, args.size)
        else:
            from sparrow_kernels.data.world import World, heldout_world_seed

            world = World(heldout_world_seed(7000 + seed))
            video = video_input(world.render(args.frames, args.size), args.frames / world.duration)
        return {"prompt": text, "multi_modal_data": {"video": video}}

    llm.generate([request(10_000)], params, use_tqdm=False)          # warm-up
    engine = llm.llm_engine
    for level in args.concurrency:
        before = spec_counters(llm)
        finish, tokens = {}, {}
        t0 = time.perf_counter()
        for i in range(level):
            engine.add_request(f"c{level}-{i}", request(i), params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finish[out.request_id] = time.perf_counter() - t0
                    tokens[out.request_id] = len(out.outputs[0].token_ids)
        wall = time.perf_counter() - t0
        after = spec_counters(llm)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        drafts = delta.get("spec_decode_num_drafts", 0)
        latencies = sorted(finish.values())
        result["levels"].append({
            "concurrency": level, "wall_s": round(wall, 3), "output_tokens": sum(tokens.values()),
            "throughput_tok_s": round(sum(tokens.values()) / wall, 2),
            "latency_mean_s": round(statistics.mean(latencies), 3), "latency_max_s": round(latencies[-1], 3),
            "mean_accepted_length": round(1 + delta["spec_decode_num_accepted_tokens"] / drafts, 3) if drafts else None,
            "spec_counters": delta})
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)


def run_config(args, name: str, draft: str | None) -> dict:
    command = [sys.executable, __file__, "--worker", "--target", str(args.target), "--k", str(args.k),
               "--max-tokens", str(args.max_tokens), "--frames", str(args.frames), "--size", str(args.size),
               "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
               "--memory-fraction", str(args.memory_fraction), "--prompt", args.prompt,
               "--concurrency", *map(str, args.concurrency)]
    if args.random_video:
        command.append("--random-video")
    if draft:
        command += ["--draft", str(draft)]
    print(f"== {name}", file=sys.stderr, flush=True)
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=None if args.verbose else subprocess.DEVNULL,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"vllm_serving: the {name} engine failed (rc {proc.returncode}); rerun with --verbose")
    return json.loads(lines[-1][len("RESULT "):])


def quick_models(root: Path) -> tuple[Path, Path, Path]:
    from sparrow_kernels.integrations.vllm.export import export_vllm
    from sparrow_kernels.integrations.vllm.tiny import build_random_draft, build_tiny_qwen25vl

    target = build_tiny_qwen25vl(root / "target")
    sparrow = export_vllm(build_random_draft(root / "sparrow", target, window=16, n_anchor=8), target,
                          root / "sparrow_vllm")
    visual = export_vllm(build_random_draft(root / "visual_kv", target, visual_kv=True), target,
                         root / "visual_kv_vllm")
    return target, sparrow, visual


def markdown(results: dict) -> str:
    names = list(results)
    header = "| concurrency | " + " | ".join(
        f"{n} tok/s | {n} latency mean s | {n} accepted length" for n in names) + " |"
    lines = [header, "|" + "---|" * (1 + 3 * len(names))]
    for i, level in enumerate(results[names[0]]["levels"]):
        cells = [str(level["concurrency"])]
        for n in names:
            row = results[n]["levels"][i]
            cells += [f"{row['throughput_tok_s']:.1f}", f"{row['latency_mean_s']:.2f}",
                      "-" if row["mean_accepted_length"] is None else f"{row['mean_accepted_length']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="Qwen2.5-VL checkpoint directory")
    parser.add_argument("--sparrow", help="export-vllm directory of the Sparrow draft")
    parser.add_argument("--visual-kv", dest="visual_kv", help="export-vllm directory of a visual-KV draft")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112, help="frame side in pixels")
    parser.add_argument("--prompt", default="Describe the video.", help="the request, in the target's chat template")
    parser.add_argument("--random-video", action="store_true", help="random pixels instead of world clips")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--memory-fraction", type=float, default=0.5,
                        help="vLLM gpu_memory_utilization (host memory on the CPU backend)")
    parser.add_argument("--quick", action="store_true", help="tiny random models, concurrency 1 2, 16 tokens")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--verbose", action="store_true", help="show the engines' logs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--draft", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.target, args.sparrow, args.visual_kv = quick_models(Path(tmp))
            args.concurrency, args.max_tokens, args.frames, args.size = [1, 2], 16, 8, 112
            args.random_video = True
            args.dtype, args.max_model_len, args.memory_fraction = "float32", 2048, 0.08
        if not args.target:
            parser.error("--target is required (or --quick)")
        configs = {"none": None, "sparrow": args.sparrow, "visual_kv": args.visual_kv}
        results = {name: run_config(args, name, draft) for name, draft in configs.items()
                   if name == "none" or draft}
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
