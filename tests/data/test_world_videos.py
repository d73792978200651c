"""Tests of sparrow_kernels/data/world_videos.py: narrated worlds written as video files plus a
prompt list that `sparrow train-draft --data` reads; the files hold the world's own frames."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sparrow_kernels.data.narration import NARRATION_PROMPTS
from sparrow_kernels.data.video_io import probe_video, read_video, sampled_fps
from sparrow_kernels.data.world import World, heldout_world_seed
from sparrow_kernels.data.world_videos import main, write_world_clips

pytest.importorskip("av")


def test_clips_hold_the_worlds_frames_and_pairs_describe_them(tmp_path):
    pairs = write_world_clips(tmp_path, count=3, fps=6.0, size=56, frames_min=4, frames_max=16,
                              narration_fraction=1.0)
    entries = json.loads(pairs.read_text())
    assert len(entries) == 3 and len({e["world_seed"] for e in entries}) == 3
    for entry in entries:
        world = World(entry["world_seed"])
        total = round(world.duration * 6.0)
        info = probe_video(entry["video"])
        assert (info.frame_count, info.height, info.width) == (total, 56, 56)
        assert info.duration == pytest.approx(world.duration, abs=0.2)
        frames = read_video(entry["video"]).numpy().astype(int)
        assert np.abs(frames - world.render(total, 56).astype(int)).max() <= 3      # near-lossless
        assert entry["prompt"] in NARRATION_PROMPTS
        assert 4 <= entry["num_frames"] <= 16 and entry["num_frames"] % 2 == 0
        assert sampled_fps(info, entry["num_frames"]) == pytest.approx(entry["num_frames"] / world.duration,
                                                                       rel=0.03)


def test_heldout_clips_use_the_reserved_seeds_and_prompts_vary(tmp_path):
    pairs = write_world_clips(tmp_path, count=6, first=7000, heldout=True, fps=2.0, size=28,
                              narration_fraction=0.0, summary_fraction=0.0)
    entries = json.loads(pairs.read_text())
    assert [e["world_seed"] for e in entries] == [heldout_world_seed(i) for i in range(7000, 7006)]
    assert not any(e["prompt"] in NARRATION_PROMPTS for e in entries)            # questions only
    assert len({e["prompt"] for e in entries}) > 1


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="multiple of 28"):
        write_world_clips(tmp_path, count=1, size=30)
    with pytest.raises(ValueError, match="count must be >= 1"):
        write_world_clips(tmp_path, count=0)
    assert main(["--out", str(tmp_path / "cli"), "--count", "1", "--fps", "2", "--size", "28"]) == 0
    assert "wrote 1 clips" in capsys.readouterr().out
