"""Triton kernels for every sparrow op, installed as `sparrow_kernels.triton_ops`.

Each function has exactly the signature of docs/ops.md (plus keyword-only tuning knobs such
as `window_attn(..., num_splits=)`); the ops front registers them as the CUDA kernels of
torch.ops.sparrow.* when the C++ CUDA build is absent. This package must not import the
compiled extension (relative imports only); with TRITON_INTERPRET=1 it runs on CPU tensors.
"""
from .gather_hidden import gather_hidden
from .kv_compact import kv_compact
from .tree_verify import tree_verify_greedy, tree_verify_sample
from .window_attn import (WindowAttnFunction, default_num_splits, window_attn, window_attn_backward,
                          window_attn_forward)

__all__ = [
    "window_attn", "window_attn_backward", "gather_hidden", "tree_verify_greedy",
    "tree_verify_sample", "kv_compact", "window_attn_forward", "WindowAttnFunction",
    "default_num_splits",
]
