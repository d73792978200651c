"""How many CPU threads torch should use: the caller's count, else OMP_NUM_THREADS, else 2 on
an idle machine and 1 when its load average says the cores are taken (a second contended
thread makes every matmul slower). One rule for training, the demo and generation; it only
sets torch's thread count and must not know about models or the command line.
"""
from __future__ import annotations

import os

import torch

IDLE_THREADS = 2   # the small models here gain little from more; on a shared 2-core machine it is all of it


def pick_threads(requested: int = 0) -> tuple[int, str]:
    """Set torch's intra-op threads and return (count, why): `requested` > 0 as given, else
    $OMP_NUM_THREADS when set, else 1 when the 1-minute load average exceeds the cores + 0.5
    (busy), else min(IDLE_THREADS, cores)."""
    if requested < 0:
        raise ValueError(f"pick_threads: requested must be >= 0 (0 = automatic), got {requested}")
    if requested > 0:
        torch.set_num_threads(requested)
        return requested, "as asked"
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        count = int(os.environ["OMP_NUM_THREADS"])
        torch.set_num_threads(count)
        return count, "from OMP_NUM_THREADS"
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform: assume idle
        load = 0.0
    if load > cores + 0.5:
        torch.set_num_threads(1)
        return 1, f"machine busy: load {load:.1f} on {cores} cores"
    count = min(IDLE_THREADS, cores)
    torch.set_num_threads(count)
    return count, f"load {load:.1f} on {cores} cores"
