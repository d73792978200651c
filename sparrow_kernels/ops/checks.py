"""One tensor-argument check for every boundary of the library (op front, targets, drafts).

Raises ValueError naming the owner, the argument and what was expected. Knows no model: callers
pass their own name ("window_attn", "SparrowDraft", ...) and the expected shape.
"""
from __future__ import annotations

import torch
from torch import Tensor

# A shape spec entry is an int (must match), None (any size) or a (symbol, int | None) pair;
# messages read e.g. "window_attn: k must have shape [B, Hkv, Tk, D] = [2, 4, ?, 64], got [2, 3, 17, 64]".
ShapeSpec = "list[int | None | tuple[str, int | None]]"


def _expected(spec) -> list[int | None]:
    return [entry[1] if isinstance(entry, tuple) else entry for entry in spec]


def format_shape(spec) -> str:
    values = "[" + ", ".join("?" if v is None else str(v) for v in _expected(spec)) + "]"
    if spec and all(isinstance(entry, tuple) for entry in spec):
        return "[" + ", ".join(name for name, _ in spec) + "] = " + values
    return values


def _same_device(actual: torch.device, expected: torch.device) -> bool:
    """Device type must match; the index only where the expected device names one."""
    return actual.type == expected.type and (expected.index is None or actual.index == expected.index)


def check_tensor(owner: str, arg: str, t, spec, dtypes=None, device: torch.device | None = None) -> None:
    """`dtypes`: a dtype, a tuple of them, or None (any). `device`: None (any) or the device to match."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{owner}: {arg} must be a tensor of shape {format_shape(spec)}, got {type(t).__name__}")
    expected = _expected(spec)
    if t.dim() != len(expected) or any(v is not None and v != s for v, s in zip(expected, t.shape)):
        raise ValueError(f"{owner}: {arg} must have shape {format_shape(spec)}, got {list(t.shape)}")
    if dtypes is not None:
        dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if t.dtype not in dtypes:
            wanted = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{owner}: {arg} must have dtype {wanted}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and not _same_device(t.device, torch.device(device)):
        raise ValueError(f"{owner}: {arg} must be on device {device}, got {t.device}")
