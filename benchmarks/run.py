"""Kernel benchmark: every sparrow op x every available backend x a documented shape sweep.

Times with CUDA-synchronised `triton.testing.do_bench` on a GPU and repeated wall-clock
(with warm-up) on the CPU; reports median time, effective GB/s, % of the measured DRAM
bandwidth (GPU) and speedup against baselines measured in the same run (the PyTorch
reference, SDPA with an explicit mask, FlexAttention). It asserts nothing about speed.

    python benchmarks/run.py [--op window_attn] [--backend cuda,triton] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import sparrow_kernels
from sparrow_kernels import ops
from sparrow_kernels.ops import reference

OPS = ("window_attn", "gather_hidden", "tree_verify_greedy", "tree_verify_sample", "kv_compact")


@dataclass
class Row:
    op: str
    case: str
    backend: str
    median_ms: float
    gbps: float
    pct_dram: float | None = None
    speedup: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- timing
def bench(fn, device: torch.device, quick: bool) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                             return_mode="median"))
    fn()  # warm-up (and compile-on-first-use paths)
    times = []
    budget = 0.05 if quick else 0.5
    t_end = time.perf_counter() + budget
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def dram_bandwidth_gbps(device: torch.device) -> float | None:
    """Measured copy bandwidth (read + write bytes / time) of a 1 GiB device copy."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, quick=False)
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def available_backends(device: torch.device, wanted: list[str] | None) -> list[str]:
    names = ["reference"]
    if device.type == "cpu":
        names.append("cpu")
    else:
        if torch._C._dispatch_has_kernel_for_dispatch_key("sparrow::window_attn", "CUDA"):
            names.append("cuda")
        try:
            import triton  # noqa: F401
            names.append("triton")
        except ImportError:
            pass
    if wanted:
        names = [n for n in names if n in wanted]
    return names


# ----------------------------------------------------------------------------- cases
def window_attn_cases(device, quick):
    """(name, B, Hq, Hkv, Tq, D, Tk, window, n_anchor, tree) sweep.

    GPU: Qwen2.5-VL-7B attention shape (28 query / 4 KV heads x 128), decode with windows
    64..8192 over KV 1k..32k, batch 1..32, and a 30-node draft tree. CPU: a small subset,
    plus the built-in tiny video LM's shapes (4 query / 2 KV heads x 32): a decode step and a
    14-node tree verification over 25k visual keys, unlimited window (the shared-prefix path).
    """
    if device.type == "cuda" and not quick:
        for B in (1, 8, 32):
            for Tk in (4096, 32768):
                for window in (256, 1024, 4096, 8192):
                    yield f"decode B={B} kv={Tk} w={window}", B, 28, 4, 1, 128, Tk, window, 64, False
        yield "decode B=1 kv=1024 w=64", 1, 28, 4, 1, 128, 1024, 64, 16, False
        yield "tree30 B=1 kv=8192 w=4096", 1, 28, 4, 30, 128, 8192, 4096, 64, True
        yield "tree64 B=4 kv=8192 w=4096", 4, 28, 4, 64, 128, 8192, 4096, 64, True
        yield "prefill B=1 T=4096 w=1024", 1, 28, 4, 4096, 128, 4096, 1024, 64, False
    elif device.type == "cuda":
        yield "decode B=8 kv=8192 w=4096", 8, 28, 4, 1, 128, 8192, 4096, 64, False
        yield "tree30 B=1 kv=8192 w=4096", 1, 28, 4, 30, 128, 8192, 4096, 64, True
    else:
        yield "decode B=1 kv=4096 w=512", 1, 8, 2, 1, 64, 4096, 512, 16, False
        yield "tree16 B=1 kv=1024 w=256", 1, 8, 2, 16, 64, 1024, 256, 16, True
        if not quick:
            yield "decode B=4 kv=16384 w=2048", 4, 8, 2, 1, 64, 16384, 2048, 16, False
            yield "prefill B=1 T=1024 w=256", 1, 8, 2, 1024, 64, 1024, 256, 16, False
            yield "tinyvlm decode B=1 kv=25000 w=0", 1, 4, 2, 1, 32, 25000, 0, 0, False
            yield "tinyvlm tree12 B=1 kv=25000 w=0", 1, 4, 2, 12, 32, 25000, 0, 0, True   # the CPU tree
            yield "tinyvlm tree14 B=1 kv=25000 w=0", 1, 4, 2, 14, 32, 25000, 0, 0, True


def random_tree_mask(B, N, device, gen):
    """Random tree in topological order: parent[i] < i. Returns ancestor-or-self mask."""
    mask = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            mask[b, i, i] = True
            if i:
                p = int(torch.randint(0, i, (1,), generator=gen))
                mask[b, i] |= mask[b, p]
    return mask.to(device)


def run_window_attn(device, dtype, backends, quick, bw):
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, B, Hq, Hkv, Tq, D, Tk, window, n_anchor, tree in window_attn_cases(device, quick):
        q = torch.randn(B, Hq, Tq, D, generator=gen).to(device, dtype)
        k = torch.randn(B, Hkv, Tk, D, generator=gen).to(device, dtype)
        v = torch.randn(B, Hkv, Tk, D, generator=gen).to(device, dtype)
        kv_len = torch.full((B,), Tk, dtype=torch.int64, device=device)
        q_pos = (torch.arange(Tq, device=device) + Tk - Tq).expand(B, Tq).contiguous()
        tree_mask = random_tree_mask(B, Tq, device, gen) if tree else None
        if Tq > 1 and not tree:  # prefill: queries are the whole sequence
            q_pos = torch.arange(Tq, device=device).expand(B, Tq).contiguous()
        visited = min(Tk, (window if window > 0 else Tk) + Tq - 1 + n_anchor)
        elt = torch.finfo(dtype).bits // 8
        nbytes = 2 * B * Hkv * visited * D * elt + 2 * B * Hq * Tq * D * elt
        times = {}
        for be in backends:
            if be == "reference" and Tk * Tq > 4096 * 4096 // 4 and device.type == "cpu":
                continue
            with sparrow_kernels.use_backend(be):
                fn = lambda: ops.window_attn(q, k, v, kv_len, q_pos, window, n_anchor, tree_mask)
                times[be] = bench(fn, device, quick)
        # Baseline: SDPA with an explicit boolean mask built once (mask construction not timed).
        allowed = reference.window_visibility(kv_len, q_pos, Tk, window, n_anchor, tree_mask)  # [B, Tq, Tk]
        qs = q
        ks = k.repeat_interleave(Hq // Hkv, dim=1)
        vs = v.repeat_interleave(Hq // Hkv, dim=1)
        attn_mask = allowed[:, None]
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask)
        times["sdpa"] = bench(sdpa, device, quick)
        flex = flex_baseline(q, k, v, window, n_anchor, Tk, Tq, tree) if device.type == "cuda" else None
        if flex is not None:
            try:
                times["flex"] = bench(flex, device, quick)
            except Exception as exc:  # FlexAttention coverage differs across torch versions
                print(f"  flex skipped for {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        for be, ms in times.items():
            gbps = nbytes / (ms * 1e-3) / 1e9
            base = {b: times[b] / ms for b in ("reference", "sdpa", "flex") if b in times and b != be}
            rows.append(Row("window_attn", f"{name} {str(dtype).split('.')[-1]}", be, ms, gbps,
                            100 * gbps / bw if bw else None, base))
    return rows


def flex_baseline(q, k, v, window, n_anchor, Tk, Tq, tree):
    """FlexAttention with a sliding-window + anchor block mask (no tree: skipped for trees)."""
    if tree:
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    offset = Tk - Tq

    def mask_mod(b, h, qi, kj):
        p = qi + offset
        ok = (kj <= p)
        if window > 0:
            ok = ok & ((kj >= p - window + 1) | (kj < n_anchor))
        return ok

    block_mask = create_block_mask(mask_mod, None, None, Tq, Tk, device=q.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def run_gather_hidden(device, dtype, backends, quick, bw):
    rows = []
    shapes = [(1, 8192, 3584, 3, 64), (8, 4096, 3584, 3, 30)] if device.type == "cuda" else [(1, 4096, 256, 3, 512)]
    for B, T, H, L, N in shapes:
        hidden = [torch.randn(B, T, H, device=device, dtype=dtype) for _ in range(L)]
        index = torch.randint(-1, T, (B, N), device=device)
        nbytes = 2 * B * N * L * H * (torch.finfo(dtype).bits // 8)
        times = {be: bench(lambda: _with(be, ops.gather_hidden, hidden, index), device, quick) for be in backends}
        times["torch.cat+index"] = bench(lambda: torch.cat([h[torch.arange(B, device=device)[:, None], index.clamp(min=0)] for h in hidden], -1), device, quick)
        rows += _rows("gather_hidden", f"B={B} T={T} H={H} L={L} N={N}", times, nbytes, bw)
    return rows


def _with(backend, fn, *args):
    with sparrow_kernels.use_backend(backend):
        return fn(*args)


def _rows(op, case, times, nbytes, bw):
    out = []
    for be, ms in times.items():
        gbps = nbytes / (ms * 1e-3) / 1e9
        base = {b: times[b] / ms for b in times if b != be and (b == "reference" or not b.startswith(("cpu", "cuda", "triton")))}
        out.append(Row(op, case, be, ms, gbps, 100 * gbps / bw if bw else None, base))
    return out


def random_linked_tree(B, N, gen):
    """Random tree in linked-list layout with node 0 the root."""
    from sparrow_kernels.speculative.tree import tree_layout

    parents = torch.tensor([[-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, N)]
                            for _ in range(B)], dtype=torch.int64)
    _, _, next_token, next_sibling = tree_layout(parents)
    return next_token, next_sibling


def run_tree_verify(device, backends, quick, bw, sample):
    rows = []
    shapes = [(1, 64, 152064), (8, 30, 152064)] if device.type == "cuda" else [(1, 30, 32000)]
    gen = torch.Generator().manual_seed(0)
    for B, N, V in shapes:
        nt, ns = random_linked_tree(B, N, gen)
        nt, ns = nt.to(device), ns.to(device)
        cand = torch.randint(0, V, (B, N), generator=gen).to(device)
        if sample:
            tp = torch.softmax(torch.randn(B, N, V, generator=gen), -1).to(device)
            dp = torch.zeros(B, N, V, device=device)
            ua = torch.rand(B, N, generator=gen).to(device)
            uf = torch.rand(B, generator=gen).to(device)
            args = (cand, tp, dp, nt, ns, ua, uf)
            fn_op, nbytes = ops.tree_verify_sample, 4 * B * N * V  # at most every node's row once
        else:
            tpred = cand.clone()
            tpred[:, ::3] = torch.randint(0, V, tpred[:, ::3].shape, generator=gen).to(device)
            args = (cand, tpred, nt, ns)
            fn_op, nbytes = ops.tree_verify_greedy, 8 * 4 * B * N
        times = {be: bench(lambda: _with(be, fn_op, *args), device, quick) for be in backends}
        rows += _rows(fn_op.__name__, f"B={B} N={N} V={V}", times, nbytes, bw)
    return rows


def run_kv_compact(device, dtype, backends, quick, bw):
    rows = []
    shapes = [(56, 8, 4, 8192, 128, 30)] if device.type == "cuda" else [(8, 2, 4, 2048, 64, 16)]
    for L, B, H, S, D, N in shapes:
        kv = torch.randn(L, B, H, S, D, device=device, dtype=dtype)
        prefix = torch.full((B,), S - N - 1, dtype=torch.int64, device=device)
        acc = torch.full((B, N), -1, dtype=torch.int64, device=device)
        acc_len = torch.full((B,), 5, dtype=torch.int64, device=device)
        acc[:, :5] = torch.tensor([0, 2, 5, 9, 14], device=device)
        nbytes = 2 * L * B * H * 5 * D * (torch.finfo(dtype).bits // 8)
        times = {be: bench(lambda: _with(be, ops.kv_compact, kv, prefix, acc, acc_len), device, quick) for be in backends}
        rows += _rows("kv_compact", f"L={L} B={B} H={H} S={S} D={D} accept=5", times, nbytes, bw)
    return rows


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="all", help="comma list of " + ", ".join(OPS))
    ap.add_argument("--backend", default="", help="comma list (reference,cpu,cuda,triton); default: all available")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float16/bfloat16/float32 (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--quick", action="store_true", help="a few shapes, short timing (CI smoke: < 1 min on CPU)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    wanted_ops = OPS if args.op == "all" else tuple(args.op.split(","))
    backends = available_backends(device, [b for b in args.backend.split(",") if b] or None)
    bw = dram_bandwidth_gbps(device)
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine()}), "
          f"torch={torch.__version__}, dtype={dtype}, backends={backends}, DRAM copy bandwidth="
          f"{'%.0f GB/s' % bw if bw else 'n/a'}")
    rows: list[Row] = []
    if "window_attn" in wanted_ops:
        rows += run_window_attn(device, dtype, backends, args.quick, bw)
    if "gather_hidden" in wanted_ops:
        rows += run_gather_hidden(device, dtype, backends, args.quick, bw)
    if "tree_verify_greedy" in wanted_ops:
        rows += run_tree_verify(device, backends, args.quick, bw, sample=False)
    if "tree_verify_sample" in wanted_ops:
        rows += run_tree_verify(device, backends, args.quick, bw, sample=True)
    if "kv_compact" in wanted_ops:
        rows += run_kv_compact(device, dtype, backends, args.quick, bw)

    print(f"{'op':<20} {'case':<40} {'backend':<16} {'median':>10} {'GB/s':>8} {'%DRAM':>6}  speedup vs")
    for r in rows:
        pct = f"{r.pct_dram:5.1f}" if r.pct_dram is not None else "   - "
        sp = " ".join(f"{k}:{v:.2f}x" for k, v in r.speedup.items())
        print(f"{r.op:<20} {r.case:<40} {r.backend:<16} {r.median_ms * 1e3:8.1f}us {r.gbps:8.1f} {pct}  {sp}")
    if args.json:
        meta = {"device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                "torch": torch.__version__, "cuda": torch.version.cuda, "dram_gbps": bw, "argv": sys.argv,
                "cpu_threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [r.__dict__ for r in rows]}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
