"""End-to-end study: autoregressive vs the visual-KV (EAGLE/MSD-style) draft vs the Sparrow
draft, at several visual-token counts, greedy and T=1, measured side by side in one run.

Reports per setting tau, decoding speedup (decode phase only), end-to-end speedup (prefill
included), tokens/s and the time split, plus the ablation table (VATA / IVSB / MTP); checks
that every greedy output equals autoregressive decoding; writes JSON and two PNG plots.
It measures; it asserts nothing about speed.

    python benchmarks/e2e.py                       # built-in tiny video LM, committed drafts
    python benchmarks/e2e.py --quick               # one short setting (CI smoke; output in a temp dir)
    python benchmarks/e2e.py --replot benchmarks/results/e2e.json   # redraw the plots of a saved run
    python benchmarks/e2e.py --target qwen2_5_vl_world   # the committed Qwen2.5-VL and its committed drafts
    python benchmarks/e2e.py --target DIR --draft sparrow=DIR --draft visual_kv=DIR2   # HF checkpoints
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_LENGTHS = (500, 1500, 6000, 12000, 25000)
METHODS = ("visual_kv", "sparrow", "vata_mtp")   # EAGLE/MSD baseline, full Sparrow recipe, the default draft
ABLATIONS = ("none", "vata", "mtp", "mtp_ivsb", "vata_mtp", "sparrow")     # the paper's ablation rows
PYTHON_SUFFIX = "_python"     # a method run with SparrowGenerator(fast_draft=False)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tiny",
                    help="'tiny', 'qwen2_5_vl_world' (the committed Qwen2.5-VL) or a local HF checkpoint directory")
    ap.add_argument("--attn-implementation", default=None,
                    help="HF targets only: transformers attention implementation (default: the adapters' 'sparrow'; "
                         "'sdpa' or 'eager' for an A/B run)")
    ap.add_argument("--draft", action="append", default=[], metavar="NAME=DIR",
                    help="drafts to compare (default: the committed target's committed visual_kv, sparrow and "
                         "vata_mtp drafts, those that exist; a user's target needs --draft)")
    ap.add_argument("--visual-tokens", default=",".join(map(str, DEFAULT_LENGTHS)))
    ap.add_argument("--videos", type=int, default=2, help="held-out synthetic videos per setting")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--ablations", action="store_true", help="also the ablation table (tau at the shortest and longest length)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved decode rounds per video, fastest kept (each video is prefilled once)")
    ap.add_argument("--ablation-lengths", default=None,
                    help="visual-token counts of the ablation table (default: the shortest and the longest)")
    ap.add_argument("--total-tokens", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--python-draft", action="store_true",
                    help="also run the default draft with its Python draft phase (no compiled CPU fast path), "
                         "as method '<name>_python', to show what the fast path buys")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads for every method (0: torch's default / OMP_NUM_THREADS)")
    ap.add_argument("--quick", action="store_true", help="one short length, one video, greedy only")
    ap.add_argument("--out", default=None,
                    help="directory for e2e.json and the plots (default benchmarks/results; --quick: a new temp dir)")
    ap.add_argument("--replot", default=None, metavar="E2E_JSON",
                    help="only redraw the plots of a saved e2e.json (into --out, default its directory)")
    args = ap.parse_args(argv)
    if args.out is None and args.replot is None:
        # a smoke run must not leave files in the source tree
        args.out = tempfile.mkdtemp(prefix="sparrow-e2e-quick-") if args.quick else str(HERE / "results")
    return args


def tree_settings(args, device, temperature: float = 0.0):
    """The library's tree preset for the device and temperature (tree.TreeShape.for_device) with
    the options given."""
    from sparrow_kernels.speculative.tree import TreeShape

    options = {key: getattr(args, key) for key in ("total_tokens", "depth", "top_k")}
    return TreeShape.for_device(device, temperature).replace(**options)


def load_drafts(args, target):
    from sparrow_kernels.speculative.draft import SparrowDraft, committed_draft_dir

    from sparrow_kernels.targets import committed_target

    specs = dict(s.split("=", 1) for s in args.draft)
    if not specs:   # the committed drafts of a committed target
        owner = committed_target(args.target)
        names = METHODS + (tuple(a for a in ABLATIONS if a not in METHODS) if args.ablations else ())
        specs = {n: committed_draft_dir(n, owner) for n in names
                 if owner and os.path.isdir(committed_draft_dir(n, owner))}
    return {name: SparrowDraft.load(path, target).to(target.device) for name, path in specs.items()}


def video_prompt(target, visual_tokens: int, index: int):
    """A held-out clip sampled densely enough for about `visual_tokens` visual tokens, with the
    detailed-description request. The tiny LM gets its own synthetic world and knows its token
    budget; an HF target gets the narrated world (held-out seed 7000 + index, sized by
    targets.world_prompt through its own preprocessing)."""
    if hasattr(target, "frames_for"):
        from sparrow_kernels.data.synthetic import VideoWorld, heldout_seed

        world = VideoWorld(heldout_seed(1000 + index))
        return target.make_prompt(world.render(target.frames_for(visual_tokens)))
    from sparrow_kernels.data.world import World, heldout_world_seed
    from sparrow_kernels.targets.world_prompt import world_prompt

    return world_prompt(target, World(heldout_world_seed(7000 + index)), visual_tokens)


class PrefillOnce:
    """A target whose prefill runs once per prompt (with every layer any caller asks for and a
    capacity large enough for all) and then hands out deep copies of that state; everything
    else is the wrapped target's. `prefill_s` maps a prompt's key to the time of its one real
    prefill; `copy_s` is the time the last copy took (a caller takes it out of a round's
    prefill time, which then holds only the method's own draft prompt pass)."""

    def __init__(self, target, layers, capacity: int):
        self._target, self._layers, self._capacity = target, tuple(sorted(set(layers))), capacity
        self._cache: dict = {}
        self.prefill_s: dict = {}
        self.copy_s = 0.0

    def __getattr__(self, name):
        return getattr(self._target, name)

    def prefill(self, prompts, layers, capacity):
        import copy

        from sparrow_kernels.targets.base import PrefillOutput

        key = tuple(id(p) for p in prompts)
        if key not in self._cache:
            start = time.perf_counter()
            self._cache[key] = self._target.prefill(prompts, self._layers, max(capacity, self._capacity))
            _sync(self._target)
            self.prefill_s[key] = time.perf_counter() - start
        full = self._cache[key]
        if capacity > full.state.capacity:
            raise ValueError(f"PrefillOnce: capacity {capacity} > the cached state's {full.state.capacity}")
        missing = [l for l in layers if l not in self._layers]
        if missing:
            raise ValueError(f"PrefillOnce: layers {missing} were not prefilled (have {list(self._layers)})")
        start = time.perf_counter()
        state = copy.deepcopy(full.state)
        _sync(self._target)
        self.copy_s = time.perf_counter() - start
        return PrefillOutput(state=state, logits=full.logits,
                             hidden=[full.hidden[self._layers.index(l)] for l in layers],
                             input_ids=full.input_ids, text_mask=full.text_mask, lengths=full.lengths)


def _sync(target) -> None:
    device = torch.device(getattr(target, "device", "cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_setting(target, drafts, tree, prompt, max_new, temperature, seed, repeats: int = 1):
    """One video: AR and every draft, `repeats` interleaved rounds (same seed, so the same
    tokens every round). The target prefills the video once (timed); every round of every
    method decodes from a copy of that state, so a round costs its decode only and repeats are
    cheap even at 25k visual tokens. Per method the round with the fastest decode phase is kept
    (the usual guard against a noisy shared machine); its prefill is the target's one measured
    prefill plus the method's own draft prompt pass. Returns per-method stats dicts and the
    equality check against autoregressive decoding."""
    from sparrow_kernels.speculative.engine import SparrowGenerator, autoregressive_generate
    from sparrow_kernels.targets.decoding import kv_capacity

    layers = sorted({l for d in drafts.values() for l in d.config.target_layers})
    capacity = kv_capacity(target.prompt_lengths([prompt])[0], max_new, tree_nodes=tree.total_tokens)
    cached = PrefillOnce(target, layers, capacity)
    cached.prefill([prompt], layers, capacity)                  # the one real prefill, timed
    target_prefill_s = cached.prefill_s[(id(prompt),)]
    rows: dict = {}

    def keep(name, res, same):
        stats = res.stats.as_dict()
        stats["prefill_s"] = target_prefill_s + max(stats["prefill_s"] - cached.copy_s, 0.0)
        stats["total_s"] = stats["prefill_s"] + stats["decode_s"]
        row = {**stats, "tokens": len(res.tokens[0]), "same_as_ar": same}
        if name not in rows or row["decode_s"] < rows[name]["decode_s"]:
            rows[name] = row

    for _ in range(max(1, repeats)):
        ar = autoregressive_generate(cached, [prompt], max_new, temperature=temperature, seed=seed)
        keep("autoregressive", ar, True)
        for name, draft in drafts.items():
            python_path = name.endswith(PYTHON_SUFFIX)
            gen = SparrowGenerator(cached, draft, tree, fast_draft=not python_path)
            res = gen.generate([prompt], max_new, temperature=temperature, seed=seed)
            keep(name, res, res.tokens[0] == ar.tokens[0])
    return rows


def aggregate(per_video):
    """Sum times and tokens over videos, then ratios against autoregressive."""
    out = {}
    for method in per_video[0]:
        runs = [v[method] for v in per_video]
        tokens = sum(r["tokens"] for r in runs)
        steps = sum(r["steps"] for r in runs)
        tot = {k: sum(r[k] for r in runs) for k in ("prefill_s", "draft_s", "verify_s", "bookkeeping_s", "decode_s", "total_s")}
        tau_num = sum(r["tau"] * r["steps"] for r in runs)
        out[method] = {"tokens": tokens, "steps": steps, "tau": (tau_num / steps) if steps else 0.0, **tot,
                       "tok_s_decode": (tokens - len(runs)) / tot["decode_s"] if tot["decode_s"] else 0.0,
                       "tok_s_e2e": tokens / tot["total_s"] if tot["total_s"] else 0.0,
                       "all_same_as_ar": all(r["same_as_ar"] for r in runs)}
    base = out["autoregressive"]
    for m in out.values():
        # decode-phase speedup per generated token (rows may emit different counts under sampling)
        m["decode_speedup"] = (base["decode_s"] / max(base["tokens"] - 1, 1)) / (m["decode_s"] / max(m["tokens"] - 1, 1)) if m["decode_s"] else 0.0
        m["e2e_speedup"] = (base["total_s"] / base["tokens"]) / (m["total_s"] / m["tokens"]) if m["total_s"] else 0.0
    return out


# one colour per method in every plot (autoregressive is the baseline at 1x)
METHOD_COLORS = {"autoregressive": "0.45", "visual_kv": "tab:red", "sparrow": "tab:purple", "vata_mtp": "tab:blue",
                 "vata_mtp" + PYTHON_SUFFIX: "tab:cyan", "none": "tab:brown", "vata": "tab:green", "mtp": "tab:orange",
                 "mtp_ivsb": "tab:pink"}
PLOTS = (("decode_speedup", "decoding speedup vs autoregressive (x)", "speedup"),
         ("tau", "tau (tokens per verification step)", "tau"))


def method_colors(methods) -> dict:
    """METHOD_COLORS, then the tab10 colours not taken, in order, for methods it does not name."""
    spare = [c for c in (f"tab:{n}" for n in ("olive", "gray", "green", "orange", "brown", "pink", "cyan"))
             if c not in METHOD_COLORS.values()] + [f"C{i}" for i in range(10)]
    colors, extra = {}, iter(spare)
    for m in methods:
        colors[m] = METHOD_COLORS.get(m) or next(extra)
    return colors


def plot_title(meta, temp) -> str:
    """What ran where: target, temperature, device (CPU with its thread count, or the GPU)."""
    target = meta.get("target", "tiny")
    name = "tiny video LM" if target == "tiny" else Path(str(target)).name
    if str(meta.get("device", "cpu")).startswith("cuda"):
        where = f"GPU {meta.get('gpu', '')}".strip()
    else:
        threads = meta.get("threads")
        where = f"CPU ({meta.get('cpu', '?')}), {threads} thread{'s' if threads != 1 else ''}"
    return f"{name}, T={float(temp):g}, {where}"


def draw(results, lengths, meta, temp, key, ylabel):
    """One figure: `key` per method against the visual tokens; the legend sits outside the axes
    (right), so it never covers a point. Returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = results[str(temp)] if str(temp) in results else results[temp]
    all_methods = list(dict.fromkeys(m for per_len in results.values() for row in per_len.values() for m in row))
    colors = method_colors(all_methods)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for m in all_methods:
        if m not in res[str(lengths[0])] or (m == "autoregressive" and key != "decode_speedup"):
            continue
        python_path = m.endswith(PYTHON_SUFFIX)   # dashed, hollow: it often lies on the compiled path's line
        ax.plot(lengths, [res[str(L)][m][key] for L in lengths], marker="o", label=m, color=colors[m],
                linestyle="--" if python_path else "-", markerfacecolor="none" if python_path else colors[m])
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(plot_title(meta, temp), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9)
    fig.tight_layout()
    return fig


def plot(results, lengths, out_dir, meta) -> list[Path]:
    """The speedup and tau plots per temperature, as PNG files in `out_dir`."""
    import matplotlib.pyplot as plt

    written = []
    for temp in results:
        for key, ylabel, fname in PLOTS:
            fig = draw(results, lengths, meta, temp, key, ylabel)
            path = Path(out_dir) / f"e2e_{fname}_T{temp}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def replot(json_path, out_dir=None) -> list[Path]:
    """Redraw the plots of a saved run (`e2e.json`) without measuring anything."""
    data = json.loads(Path(json_path).read_text())
    lengths = sorted({int(L) for per_len in data["results"].values() for L in per_len})
    return plot(data["results"], lengths, Path(out_dir) if out_dir else Path(json_path).parent, data["meta"])


def markdown(meta, results, ablation) -> str:
    """The study as Markdown tables (what RESULTS.md quotes): one row per setting and method
    (prefill per run, draft / verify / other per verification step), then the ablation's tau."""
    sampled = f" (T > 0: {meta['tree_sampled']})" if "tree_sampled" in meta else ""
    lines = [f"tree {meta['tree']}{sampled}, {meta['videos']} video(s) per setting, {meta['threads']} thread(s), "
             f"torch {meta['torch']}, `{' '.join(meta['argv'])}`", "",
             "| T | visual tokens | method | tau | decoding speedup | end-to-end speedup | decode tok/s | prefill s "
             "| draft ms/step | verify ms/step | other ms/step | greedy = AR |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for temp, per_len in results.items():
        for length, rows in per_len.items():
            for name, r in rows.items():
                steps = max(r["steps"], 1)
                same = ("yes" if r["all_same_as_ar"] else "**NO**") if float(temp) == 0 else "-"
                lines.append(f"| {float(temp):g} | {int(length):,} | {name} | {r['tau']:.2f} | {r['decode_speedup']:.2f}x "
                             f"| {r['e2e_speedup']:.2f}x | {r['tok_s_decode']:.1f} | {r['prefill_s']:.2f} "
                             f"| {1e3 * r['draft_s'] / steps:.1f} | {1e3 * r['verify_s'] / steps:.1f} "
                             f"| {1e3 * r['bookkeeping_s'] / steps:.1f} | {same} |")
    if ablation:
        lengths = list(ablation)
        names = list(dict.fromkeys(n for row in ablation.values() for n in row))
        lines += ["", "Ablation (tau, greedy)", "",
                  "| draft | " + " | ".join(f"{int(L):,} visual tokens" for L in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{ablation[L].get(n, float('nan')):.2f}" for L in lengths) + " |")
    return "\n".join(lines) + "\n"


def save(args, meta, results, ablation) -> Path:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "e2e_quick" if args.quick else "e2e"
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results, "ablation": ablation}, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(meta, results, ablation))
    return out_dir


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        for path in replot(args.replot, args.out):
            print(f"e2e: wrote {path}")
        return 0
    from sparrow_kernels.targets import load_target

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.attn_implementation is not None and args.target == "tiny":
        sys.exit("e2e: --attn-implementation applies to HF checkpoint targets only, not 'tiny'")
    attn = {} if args.attn_implementation is None else {"attn_implementation": args.attn_implementation}
    target = load_target(args.target, device=device, **attn)
    drafts = load_drafts(args, target)
    if not drafts:
        sys.exit("e2e: no drafts found (train them with `sparrow train-draft` or pass --draft NAME=DIR)")
    lengths = [500] if args.quick else [int(x) for x in args.visual_tokens.split(",")]
    temps = [0.0] if args.quick else [float(t) for t in args.temperatures.split(",")]
    videos = 1 if args.quick else args.videos
    trees = {temp: tree_settings(args, device, temp) for temp in temps}
    tree = trees.get(0.0) or tree_settings(args, device)     # greedy (and the ablation)
    main_drafts = {n: d for n, d in drafts.items() if n in METHODS or not args.ablations}
    if args.python_draft:
        from sparrow_kernels.speculative.draft import DEFAULT_DRAFT

        name = DEFAULT_DRAFT if DEFAULT_DRAFT in main_drafts else next(iter(main_drafts))
        main_drafts[name + PYTHON_SUFFIX] = main_drafts[name]
    meta = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(), "target": args.target,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
            "tree": tree.as_dict(), **({"tree_sampled": trees[max(temps)].as_dict()} if max(temps) > 0 else {}),
            "max_new_tokens": args.max_new_tokens, "videos": videos, "repeats": args.repeats,
            "prefill": "once per video, shared by every method and round", "argv": sys.argv,
            "attn_implementation": getattr(getattr(getattr(target, "model", None), "config", None),
                                           "_attn_implementation", None)}  # HF targets only
    print(f"e2e: target={args.target} drafts={list(drafts)} trees={ {t: str(trees[t]) for t in temps} } lengths={lengths} temps={temps} videos={videos}")
    results: dict = {}
    for temp in temps:
        results[str(temp)] = {}
        for L in lengths:
            per_video = []
            for i in range(videos):
                prompt = video_prompt(target, L, i)
                per_video.append(run_setting(target, main_drafts, trees[temp], prompt, args.max_new_tokens, temp, seed=i,
                                             repeats=args.repeats))
            agg = aggregate(per_video)
            results[str(temp)][str(L)] = agg
            save(args, meta, results, {})   # after every setting, so a stopped run keeps its numbers
            for m, r in agg.items():
                print(f"T={temp:g} visual={L:6d} {m:<15} tau {r['tau']:5.2f}  decode x{r['decode_speedup']:5.2f}  "
                      f"e2e x{r['e2e_speedup']:5.2f}  {r['tok_s_decode']:7.1f} tok/s  prefill {r['prefill_s']:6.2f}s "
                      f"draft {r['draft_s']:6.2f}s verify {r['verify_s']:6.2f}s other {r['bookkeeping_s']:6.2f}s"
                      + ("" if temp > 0 else f"  same_as_ar={r['all_same_as_ar']}"), flush=True)
    ablation = {}
    if args.ablations and not args.quick:
        abl = {n: drafts[n] for n in ABLATIONS if n in drafts}
        abl_lengths = [int(x) for x in args.ablation_lengths.split(",")] if args.ablation_lengths \
            else [lengths[0], lengths[-1]]
        for L in abl_lengths:
            per_video = []
            for i in range(videos):
                prompt = video_prompt(target, L, i)
                per_video.append(run_setting(target, abl, tree, prompt, args.max_new_tokens, 0.0, seed=i))
            ablation[str(L)] = {m: r["tau"] for m, r in aggregate(per_video).items() if m != "autoregressive"}
        print("ablation (tau, greedy): " + json.dumps(ablation))
    out_dir = save(args, meta, results, ablation)
    if not args.quick:
        plot(results, lengths, out_dir, meta)
    bad = [(t, L, m) for t, rt in results.items() for L, rl in rt.items() for m, r in rl.items()
           if float(t) == 0 and not r["all_same_as_ar"]]
    if bad:
        print(f"e2e: greedy outputs differ from autoregressive in {bad}", file=sys.stderr)
        return 1
    print(f"e2e: all greedy outputs identical to autoregressive; wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
