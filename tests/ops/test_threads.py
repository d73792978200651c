"""sparrow_kernels.ops.threads.pick_threads: the count asked for, else $OMP_NUM_THREADS, else 1 thread
when the load average says the cores are taken and 2 (at most the cores) when they are idle."""
from __future__ import annotations

import os

import pytest
import torch

from sparrow_kernels.ops.threads import IDLE_THREADS, pick_threads


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_busy_machine_gets_one_thread(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 3.0, 2.0))
    assert pick_threads() == (1, "machine busy: load 3.2 on 2 cores") and torch.get_num_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 1.0, 1.0))
    count, why = pick_threads()
    assert count == min(IDLE_THREADS, 2) == torch.get_num_threads() and why == "load 0.4 on 2 cores"
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert pick_threads()[0] == 1


def test_asked_count_and_environment_win(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert pick_threads(3) == (3, "as asked") and torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert pick_threads() == (2, "from OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="requested must be >= 0"):
        pick_threads(-1)
