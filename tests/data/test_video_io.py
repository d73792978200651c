"""Tests of sparrow_kernels.data.video_io on real files written with PyAV (mp4/h264 and mpeg4,
webm/vp8 and vp9, avi/mjpeg and mpeg4): frame count, sampled indices (each frame's brightness
encodes its index), resize, and the errors for missing, corrupt, truncated and oversized input.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels.data import video_io
from sparrow_kernels.data.video_io import VideoTooLargeError, probe_video, read_video, uniform_indices

av = pytest.importorskip("av")

FRAMES, HEIGHT, WIDTH, RATE = 24, 48, 64, 12
FORMATS = [  # (file suffix, codec, pixel format)
    ("mp4", "libx264", "yuv420p"),
    ("mp4", "mpeg4", "yuv420p"),
    ("webm", "libvpx", "yuv420p"),
    ("webm", "libvpx-vp9", "yuv420p"),
    ("avi", "mjpeg", "yuvj420p"),
    ("avi", "mpeg4", "yuv420p"),
]


def level(index: int) -> int:
    """The grey level that marks frame `index` (distinct after lossy coding)."""
    return 20 + 9 * index


def frame_index(frame: torch.Tensor) -> int:
    return round((frame.float().mean().item() - 20) / 9)


def synthetic_frames(count: int = FRAMES) -> torch.Tensor:
    frames = torch.stack([torch.full((HEIGHT, WIDTH, 3), level(i), dtype=torch.uint8) for i in range(count)])
    frames[:, 8:16, 8:24, 0] = 200  # a red bar so the channels are not all equal
    return frames  # [T, H, W, 3]


def write_video(path: Path, codec: str, pix_fmt: str, frames: torch.Tensor, rate: int = RATE,
                options: dict | None = None) -> Path:
    """The library's writer with a codec of this test (skipped where PyAV lacks the encoder);
    `options` here are the container's (movflags)."""
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001 (PyAV builds differ in the encoders they ship)
        pytest.skip(f"this PyAV build has no {codec} encoder")
    quality = {"libx264": {"crf": "10"}, "mpeg4": {"qscale": "2"}, "mjpeg": {"qscale": "2"}}.get(codec, {})
    return video_io.write_video(path, frames, rate, codec=codec, pix_fmt=pix_fmt, options=quality,
                                container_options=options)


@pytest.fixture(scope="module")
def mp4_file(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", "mpeg4", "yuv420p", synthetic_frames())


@pytest.mark.parametrize("suffix,codec,pix_fmt", FORMATS, ids=[f"{s}-{c}" for s, c, _ in FORMATS])
def test_round_trip_every_container(tmp_path, suffix, codec, pix_fmt):
    frames = synthetic_frames()
    path = write_video(tmp_path / f"clip.{suffix}", codec, pix_fmt, frames)
    out = read_video(path)
    assert out.dtype == torch.uint8 and out.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert [frame_index(f) for f in out] == list(range(FRAMES))
    assert (out.float() - frames.float()).abs().mean() < 4.0  # lossy codecs, smooth content
    info = probe_video(path)
    assert (info.height, info.width) == (HEIGHT, WIDTH) and abs(info.fps - RATE) < 0.01


def test_uniform_sampling_picks_evenly_spread_frames(mp4_file):
    out = read_video(mp4_file, num_frames=5)
    assert [frame_index(f) for f in out] == [0, 6, 12, 17, 23]  # round(i * 23 / 4)


@settings(max_examples=15, deadline=None)
@given(num_frames=st.integers(1, 40))
def test_uniform_sampling_any_count(mp4_file, num_frames):
    out = read_video(mp4_file, num_frames=num_frames)
    picked = [frame_index(f) for f in out]
    assert len(picked) == min(num_frames, FRAMES)
    assert picked == uniform_indices(FRAMES, num_frames)
    assert all(a < b for a, b in zip(picked, picked[1:]))
    if num_frames >= 2:
        assert picked[0] == 0 and picked[-1] == FRAMES - 1


@pytest.mark.parametrize("fps,expected", [(3, [0, 4, 8, 12, 16, 20]), (12, list(range(FRAMES))),
                                          (50, list(range(FRAMES))), (0.4, [0])])
def test_fps_sampling_by_presentation_time(mp4_file, fps, expected):
    out = read_video(mp4_file, fps=fps)
    assert [frame_index(f) for f in out] == expected


def test_resize(mp4_file):
    out = read_video(mp4_file, num_frames=3, size=(30, 40))
    assert out.shape == (3, 30, 40, 3)
    assert [frame_index(f) for f in out] == [0, 12, 23]
    assert out[:, :, :, 0].float().max() > 150  # the red bar survives the resize


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="video file not found: .*nothing.mp4"):
        read_video(tmp_path / "nothing.mp4")
    with pytest.raises(FileNotFoundError):
        probe_video(tmp_path / "nothing.mp4")


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 50, bytes(range(256)) * 40])
def test_corrupt_data(tmp_path, content):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.mp4"):
        read_video(path)


def test_truncated_with_index_at_front_decodes_zero_frames(tmp_path):
    """moov first (faststart), the media data box cut off: FFmpeg decodes nothing and raises
    nothing, so the reader must notice from the count it got."""
    path = write_video(tmp_path / "front.mp4", "mpeg4", "yuv420p", synthetic_frames(),
                       options={"movflags": "faststart"})
    data = path.read_bytes()
    mdat_box = data.index(b"mdat") - 4  # the box starts with its 4-byte size
    path.write_bytes(data[:mdat_box])
    assert probe_video(path).frame_count == FRAMES  # the container still claims every frame
    with pytest.raises(ValueError, match=rf"decoded 0 video frames \(the container claims {FRAMES}\)"):
        read_video(path, num_frames=4)
    with pytest.raises(ValueError, match="decoded 0 video frames"):
        read_video(path)
    with pytest.raises(ValueError, match="decoded 0 video frames"):
        read_video(path, fps=2)
    # cut just inside the box: the first packet is garbage, FFmpeg raises mid-decode
    path.write_bytes(data[:mdat_box + 12])
    with pytest.raises(ValueError, match=r"front.mp4: corrupt video data, no frame decodes"):
        read_video(path, num_frames=4)


@pytest.mark.parametrize("kept_packets", [1, 10, 23])
def test_truncated_midway_keeps_what_decodes(tmp_path, kept_packets):
    """Cut at a packet boundary: the frames before the cut decode, with a warning, and
    `num_frames` sampling spreads over those instead of the claimed count."""
    path = write_video(tmp_path / "part.mp4", "mpeg4", "yuv420p", synthetic_frames(),
                       options={"movflags": "faststart"})
    with av.open(str(path)) as container:
        offsets = [p.pos for p in container.demux(container.streams.video[0]) if p.size]
    data = path.read_bytes()
    path.write_bytes(data[:offsets[kept_packets]])
    with pytest.warns(UserWarning, match=f"claims {FRAMES} frames but {kept_packets} decode"):
        every = read_video(path)
    assert [frame_index(f) for f in every] == list(range(kept_packets))
    with pytest.warns(UserWarning, match=f"claims {FRAMES} frames but {kept_packets} decode; sampling"):
        out = read_video(path, num_frames=4)
    assert [frame_index(f) for f in out] == uniform_indices(kept_packets, 4)
    torch.testing.assert_close(out, every[uniform_indices(kept_packets, 4)], rtol=0, atol=0)


def test_too_many_frames_for_the_memory_budget(mp4_file):
    frame_bytes = HEIGHT * WIDTH * 3
    with pytest.raises(VideoTooLargeError, match=r"24 frames of 48x64 .* at most 10 frames fit"):
        read_video(mp4_file, max_bytes=10 * frame_bytes + 5)
    with pytest.raises(VideoTooLargeError, match="at most 2 frames fit"):
        read_video(mp4_file, num_frames=3, size=(HEIGHT, WIDTH), max_bytes=2 * frame_bytes)
    assert read_video(mp4_file, num_frames=2, max_bytes=2 * frame_bytes).shape[0] == 2


def test_bad_arguments(mp4_file):
    with pytest.raises(ValueError, match="num_frames or fps, not both"):
        read_video(mp4_file, num_frames=2, fps=1.0)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        read_video(mp4_file, num_frames=0)
    with pytest.raises(ValueError, match="fps must be > 0"):
        read_video(mp4_file, fps=0)
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        read_video(mp4_file, size=(0, 10))


@pytest.fixture(scope="module")
def raw_m4v(tmp_path_factory) -> Path:
    """300 frames of 640x480 in a raw MPEG-4 elementary stream: no container, no frame count."""
    path = tmp_path_factory.mktemp("raw") / "clip.m4v"
    with av.open(str(path), "w", format="m4v") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        stream.options = {"qscale": "2"}
        for i in range(300):
            rgb = torch.full((480, 640, 3), i % 250, dtype=torch.uint8).numpy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_stream_without_frame_count_is_sampled_while_decoding(raw_m4v, monkeypatch):
    """num_frames=4 of 300 unknown-count frames: the budget covers the 4 kept frames only, and
    no more than those are ever held (before: all 300 decoded and kept, ~276 MB)."""
    import weakref

    assert probe_video(raw_m4v).frame_count == 0
    live, most_live = [], [0]
    to_tensor = torch.from_numpy

    def counting_from_numpy(array):  # every decoded frame the reader holds passes through here
        tensor = to_tensor(array)
        live.append(weakref.ref(tensor))
        most_live[0] = max(most_live[0], sum(ref() is not None for ref in live))
        return tensor

    monkeypatch.setattr(torch, "from_numpy", counting_from_numpy)
    frame_bytes = 480 * 640 * 3
    out = read_video(raw_m4v, num_frames=4, max_bytes=5 * frame_bytes)
    assert out.shape == (4, 480, 640, 3)
    levels = [round(f.float().mean().item()) for f in out]
    assert all(abs(a - b % 250) <= 3 for a, b in zip(levels, uniform_indices(300, 4))), levels
    assert most_live[0] <= 4, f"{most_live[0]} decoded frames held at once"


def test_fps_above_the_stream_rate_keeps_every_frame_once(mp4_file):
    """fps=1e9 on a 24-frame file: the estimate is capped by the real frame count (before: it
    estimated 2e9 frames and raised VideoTooLargeError)."""
    out = read_video(mp4_file, fps=1e9)
    assert [frame_index(f) for f in out] == list(range(FRAMES))
    frame_bytes = HEIGHT * WIDTH * 3
    assert read_video(mp4_file, fps=1e9, max_bytes=FRAMES * frame_bytes).shape[0] == FRAMES


def test_too_large_suggests_a_valid_fix(mp4_file):
    with pytest.raises(VideoTooLargeError, match=r"not even one frame fits \(pass a smaller size or a larger max_bytes\)") \
            as info:
        read_video(mp4_file, max_bytes=100)
    assert "num_frames<=0" not in str(info.value)
    with pytest.raises(VideoTooLargeError, match=r"pass num_frames=3 or fewer"):
        read_video(mp4_file, max_bytes=3 * HEIGHT * WIDTH * 3)


def test_paths_that_are_not_video_files(tmp_path):
    import os

    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory, not a video file"):
        read_video(tmp_path)
    loop = tmp_path / "loop.mp4"
    os.symlink(loop, loop)
    with pytest.raises(ValueError, match="loop.mp4: a loop of symbolic links"):
        read_video(loop)
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="pipe.mp4 is a pipe, not a video file"):
        read_video(fifo)
    with pytest.raises(ValueError, match="/dev/null is a device, not a video file"):
        probe_video("/dev/null")
    dangling = tmp_path / "gone.mp4"
    os.symlink(tmp_path / "missing.mp4", dangling)
    with pytest.raises(FileNotFoundError, match="gone.mp4 .a symbolic link to .*missing.mp4, which does not exist"):
        read_video(dangling)


def test_write_video_default_is_near_lossless_and_states_its_rate(tmp_path):
    frames = (torch.rand(10, 28, 56, 3) * 255).to(torch.uint8)
    frames[:, :, :28] = torch.tensor([240, 30, 20], dtype=torch.uint8)        # a flat red half
    path = video_io.write_video(tmp_path / "clip.mp4", frames, fps=2.5)
    info = probe_video(path)
    assert (info.frame_count, info.height, info.width) == (10, 28, 56)
    assert info.fps == pytest.approx(2.5) and info.duration == pytest.approx(4.0)
    back = read_video(path)
    assert (back[:, :, :28].int() - frames[:, :, :28].int()).abs().max() <= 2
    assert video_io.sampled_fps(info, 4) == pytest.approx(1.0)                  # 4 frames over 4 seconds
    assert video_io.sampled_fps(info, 0) is None


@pytest.mark.parametrize("frames, fps, match", [
    (torch.zeros(2, 8, 8, 3), 2.0, "uint8"),
    (torch.zeros(2, 8, 8, dtype=torch.uint8), 2.0, r"\[T>=1, H, W, 3\]"),
    (torch.zeros(0, 8, 8, 3, dtype=torch.uint8), 2.0, r"\[T>=1, H, W, 3\]"),
    (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), 0.0, "fps must be a positive"),
    (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), float("nan"), "fps must be a positive"),
])
def test_write_video_bad_arguments(tmp_path, frames, fps, match):
    with pytest.raises(ValueError, match=match):
        video_io.write_video(tmp_path / "x.mp4", frames, fps)
    assert not (tmp_path / "x.mp4").exists()


def test_sampled_fps_without_a_stated_duration():
    info = video_io.VideoInfo(frame_count=20, fps=10.0, duration=0.0, height=8, width=8, codec="x")
    assert video_io.sampled_fps(info, 4) == pytest.approx(2.0)                 # 4 frames over 20 / 10 s
    unknown = video_io.VideoInfo(frame_count=0, fps=0.0, duration=0.0, height=8, width=8, codec="x")
    assert video_io.sampled_fps(unknown, 4) is None
