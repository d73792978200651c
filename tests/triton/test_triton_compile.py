"""Every Triton kernel compiles to a cubin for sm_90 (the lent GPUs) and the attention kernels
for sm_80 too, with no GPU: the interpreter runs Python control flow the compiler may
reject (loop-carried types, scalar branches, dot shapes), and this catches that in CI.
Compilation runs in a subprocess because TRITON_INTERPRET=1 replaces @triton.jit here.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _attention_types(elem: str):
    def types(name: str) -> str:
        if name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"):
            return f"*{elem}"
        if name in ("kv_len_ptr", "q_pos_ptr"):
            return "*i64"
        if name == "tree_ptr":
            return "*u8"
        if name.endswith("_ptr"):
            return "*fp32"
        return "fp32" if name in ("scale", "scale_log2") else "i32"
    return types


def _tree_types(name: str) -> str:
    if name in ("target_ptr", "draft_ptr", "uniform_accept_ptr", "uniform_final_ptr", "residual_ptr"):
        return "*fp32"
    return "*i64" if name.endswith("_ptr") else "i32"


def kernel_configs(arch: int):
    """(label, module, kernel, arg types, constexprs, num_warps, num_stages) to compile."""
    attn = _attention_types("fp16")
    attn_consts = dict(BLOCK_N=64, BLOCK_D=64, DOT_PRECISION="tf32")
    configs = [
        ("window_attn fwd tree", "window_attn", "_window_attn_fwd_kernel", attn,
         dict(GROUP=3, HAS_TREE=True, NUM_SPLITS=1, BLOCK_M=64, **attn_consts), 4, 3),
        ("window_attn bwd dk/dv", "window_attn", "_window_attn_bwd_dkdv_kernel", attn,
         dict(GROUP=3, HAS_TREE=True, BLOCK_M=64, **attn_consts), 4, 2),
    ]
    if arch >= 90:
        configs += [
            ("window_attn fwd split decode", "window_attn", "_window_attn_fwd_kernel", attn,
             dict(GROUP=7, HAS_TREE=False, NUM_SPLITS=4, BLOCK_M=16, **attn_consts), 4, 3),
            ("window_attn bwd dq", "window_attn", "_window_attn_bwd_dq_kernel", attn,
             dict(GROUP=3, HAS_TREE=True, BLOCK_M=64, **attn_consts), 4, 2),
            ("merge splits", "window_attn", "_merge_splits_kernel",
             lambda n: "*fp16" if n == "out_ptr" else ("*fp32" if n.endswith("_ptr") else "i32"),
             dict(NUM_SPLITS=4, BLOCK_S=4, BLOCK_D=64), 4, 1),
            ("tree_verify_greedy", "tree_verify", "_tree_verify_greedy_kernel",
             lambda n: "*i64" if n.endswith("_ptr") else "i32", dict(BLOCK_N=32), 1, 1),
            ("tree_verify_sample", "tree_verify", "_tree_verify_sample_kernel", _tree_types,
             dict(BLOCK_N=32, BLOCK_V=1024), 4, 1),
            ("gather_hidden", "gather_hidden", "_gather_hidden_kernel",
             lambda n: "*i64" if n == "index_ptr" else ("*bf16" if n.endswith("_ptr") else "i32"),
             dict(N_LAYERS=4, BLOCK_H=256), 2, 1),
            ("kv_compact", "kv_compact", "_kv_compact_kernel",
             lambda n: "*i16" if n == "kv_ptr" else ("*i64" if n.endswith("_ptr") else "i32"),
             dict(BLOCK_D=128), 1, 1),
        ]
    return configs


def compile_all(arch: int) -> None:
    """Compile every config for `arch` (run without TRITON_INTERPRET); prints one line each."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    for label, module, name, types, constexprs, num_warps, num_stages in kernel_configs(arch):
        kernel = getattr(importlib.import_module(f"sparrow_kernels.triton_ops.{module}"), name)
        signature = {arg: "constexpr" if arg in constexprs else types(arg) for arg in kernel.arg_names}
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
        compiled = triton.compile(source, target=target, options=options.__dict__)
        assert compiled.asm.get("cubin"), f"{label}: no cubin for sm_{arch}"
        print(f"sm_{arch} {label}: ok, shared memory {compiled.metadata.shared} bytes", flush=True)


def _ptxas_available() -> bool:
    try:
        from triton import knobs
        return knobs.nvidia.ptxas.path is not None
    except Exception:  # noqa: BLE001 - any failure to locate ptxas means: cannot compile here
        return False


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_to_a_cubin(arch):
    if not _ptxas_available():
        pytest.skip("triton's bundled ptxas is missing: cannot compile cubins on this machine")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in sys.path if p])
    run = subprocess.run([sys.executable, "-c",
                          f"from tests.triton.test_triton_compile import compile_all; compile_all({arch})"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"compiling for sm_{arch} failed:\n{run.stdout}\n{run.stderr[-6000:]}"
    assert run.stdout.count(": ok") == len(kernel_configs(arch)), run.stdout
