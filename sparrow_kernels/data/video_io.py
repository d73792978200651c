"""Read video files (mp4, webm, avi, ... whatever FFmpeg decodes) into `[T, H, W, 3]` uint8 RGB
frames with PyAV: uniform sampling to N frames or at a frame rate, optional resize; and write
frames back to a file (`write_video`, for rendered worlds and tests).

Fails loudly with the reason: missing file, a path that is no regular file, corrupt data, a
stream that decodes no frames, or a request that would not fit in memory. Only the frames it
returns are held in memory. It must not know about any model.
"""
from __future__ import annotations

import errno
import math
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

BYTES_PER_PIXEL = 3  # rgb24


class VideoTooLargeError(MemoryError):
    """The decoded frames would not fit the memory budget."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream (may be estimates)."""

    frame_count: int        # frames claimed by the container (0 if unknown)
    fps: float              # average frame rate (0.0 if unknown)
    duration: float         # seconds (0.0 if unknown)
    height: int
    width: int
    codec: str


def _av():
    import av  # noqa: PLC0415 (optional dependency, imported on use)

    return av


def _check_path(path: Path) -> None:
    """A readable regular file, or an error that says what the path is instead."""
    try:
        mode = path.stat().st_mode  # follows symbolic links
    except FileNotFoundError as err:
        if path.is_symlink():
            raise FileNotFoundError(f"video file not found: {path} (a symbolic link to "
                                    f"{os.readlink(path)}, which does not exist)") from err
        raise FileNotFoundError(f"video file not found: {path}") from err
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"{path}: a loop of symbolic links, not a video file") from err
        raise ValueError(f"{path}: cannot open the video file ({err.strerror or err})") from err
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a directory, not a video file")
    if not stat.S_ISREG(mode):
        kind = "a pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise ValueError(f"{path} is {kind}, not a video file (sampling reads the file twice, so it must be "
                         f"a regular file: save the stream to a file and pass its path)")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: no permission to read the video file")


def _open(path: Path):
    av = _av()
    _check_path(path)
    try:
        container = av.open(str(path))
    except av.error.FileNotFoundError as err:  # raced away between the check and the open
        raise FileNotFoundError(f"video file not found: {path}") from err
    except (av.error.InvalidDataError, av.error.FFmpegError) as err:
        raise ValueError(f"{path}: not a readable video (corrupt or unsupported data: {err})") from err
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: the file has no video stream")
    return container


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Container metadata of the first video stream, without decoding frames."""
    path = Path(path)
    container = _open(path)
    try:
        return _info(container)
    finally:
        container.close()


def _info(container) -> VideoInfo:
    stream = container.streams.video[0]
    fps = float(stream.average_rate) if stream.average_rate else 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        duration = 0.0
    frame_count = int(stream.frames or 0)
    if frame_count == 0 and fps > 0 and duration > 0:
        frame_count = int(round(duration * fps))
    codec = stream.codec_context.name if stream.codec_context is not None else "?"
    return VideoInfo(frame_count=frame_count, fps=fps, duration=duration, height=int(stream.height or 0),
                     width=int(stream.width or 0), codec=codec)


def sampled_fps(info: VideoInfo, count: int) -> float | None:
    """Frame rate, in the clip's time, of `count` frames that evenly cover the whole clip (what
    `read_video(num_frames=count)` and `read_video()` return); the duration is the container's, or
    frame count / rate where it states none; None when neither is known."""
    duration = info.duration if info.duration > 0 else (info.frame_count / info.fps if info.fps > 0 else 0.0)
    if count < 1 or not duration > 0:
        return None
    return count / duration


def write_video(path: str | os.PathLike, frames, fps: float, codec: str = "libx264", pix_fmt: str = "yuv444p",
                options: dict[str, str] | None = None, container_options: dict[str, str] | None = None) -> Path:
    """Encode RGB frames `[T, H, W, 3]` uint8 (tensor or array) at `fps` frames per second.
    The default (H.264, 4:4:4, constant quality 0) keeps colours within a level or two of the
    input; `options` are the encoder's (e.g. {"crf": "23"}, {"qscale": "2"} for mpeg4),
    `container_options` the muxer's (e.g. {"movflags": "faststart"})."""
    import numpy as np  # noqa: PLC0415

    av = _av()
    array = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or array.shape[0] < 1:
        raise ValueError(f"write_video: frames must be [T>=1, H, W, 3] uint8, got {array.dtype} {tuple(array.shape)}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"write_video: fps must be a positive frame rate, got {fps}")
    from fractions import Fraction  # noqa: PLC0415

    path = Path(path)
    with av.open(str(path), "w", options=dict(container_options or {})) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], pix_fmt
        stream.options = dict(options) if options is not None else ({"crf": "0"} if codec == "libx264" else {})
        for rgb in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def available_memory_bytes() -> int:
    """Half of the currently available RAM: the default budget for decoded frames."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def uniform_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over `[0, total)` (first and last included)."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def read_video(path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
               size: tuple[int, int] | None = None, max_bytes: int | None = None) -> torch.Tensor:
    """Decode a video file to `[T, H, W, 3]` uint8 RGB.

    - `num_frames`: T frames spread uniformly over the whole video (fewer if it is shorter);
      `fps`: one frame every `1/fps` seconds of presentation time; neither: every frame.
    - `size`: `(height, width)` to resize to (FFmpeg's swscale, bicubic); default: as stored.
    - `max_bytes`: memory budget of the result (default: half the available RAM); a request
      over it raises `VideoTooLargeError` saying how many frames would fit. Only the kept
      frames count (and only they are held): a stream without a frame count (e.g. a raw .m4v)
      has its packets counted first, so `num_frames` sampling picks its frames while decoding.
    Raises FileNotFoundError for a missing file, IsADirectoryError for a directory, ValueError
    for a path that is no regular file (pipe, device, symbolic link loop), corrupt data, no video
    stream, or a stream that decodes no frames although the container claims some.
    """
    if num_frames is not None and fps is not None:
        raise ValueError("read_video: pass num_frames or fps, not both")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"read_video: num_frames must be >= 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"read_video: fps must be > 0, got {fps}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"read_video: size must be (height, width) with both >= 1, got {size}")
    path = Path(path)
    budget = available_memory_bytes() if max_bytes is None else int(max_bytes)
    container = _open(path)
    try:
        info = _info(container)
        height, width = size if size is not None else (info.height, info.width)
        frame_bytes = height * width * BYTES_PER_PIXEL
        if num_frames is not None:
            expected = min(num_frames, info.frame_count) if info.frame_count else num_frames
        elif fps is not None:
            expected = max(1, int(info.duration * fps) + 1) if info.duration else 0
            if info.frame_count:  # a rate above the stream's keeps each frame at most once
                expected = min(expected, info.frame_count)
        else:
            expected = info.frame_count
        if expected * frame_bytes > budget:
            raise VideoTooLargeError(
                f"{path}: {expected} frames of {height}x{width} need {expected * frame_bytes / 2**20:.1f} MiB, "
                f"over the budget of {budget / 2**20:.1f} MiB; {_fix_for_budget(budget, frame_bytes)}")
        limit = budget // max(frame_bytes, 1)
        if num_frames is not None:
            claimed, claim = info.frame_count, "the container claims"
            if not claimed:  # no count in the container: count the packets (no decoding, nothing kept)
                claimed, claim = _count_packets(container), "the stream holds"
                container.close()
                container = _open(path)
            wanted = set(uniform_indices(claimed, num_frames))
            frames, decoded = _decode(container, path, size, keep_index=wanted, limit=limit)
            if decoded != claimed:
                # the count was wrong: sample again over the frames that exist
                if decoded == 0:
                    raise ValueError(_no_frames(path, info))
                warnings.warn(f"{path}: {claim} {claimed} frames but {decoded} decode; "
                              f"sampling over the {decoded}", stacklevel=2)
                container.close()
                container = _open(path)
                keep = set(uniform_indices(decoded, num_frames))
                frames, _ = _decode(container, path, size, keep_index=keep, limit=len(keep), max_decode=decoded)
        else:
            frames, decoded = _decode(container, path, size, period=(1.0 / fps) if fps else None, limit=limit)
            if info.frame_count and 0 < decoded < info.frame_count:
                warnings.warn(f"{path}: the container claims {info.frame_count} frames but {decoded} decode",
                              stacklevel=2)
        if not frames:
            raise ValueError(_no_frames(path, info))
        return torch.stack(frames)  # [T, H, W, 3]
    finally:
        container.close()


def _fix_for_budget(budget: int, frame_bytes: int) -> str:
    """What to change when frames do not fit the budget (a fix that is valid as stated)."""
    fit = budget // max(frame_bytes, 1)
    if fit >= 1:
        return (f"at most {fit} frames fit (pass num_frames={fit} or fewer, a lower fps, a smaller size, "
                f"or a larger max_bytes)")
    return "not even one frame fits (pass a smaller size or a larger max_bytes)"


def _count_packets(container) -> int:
    """Packets of the first video stream (one per frame for video codecs), read without decoding;
    a stream cut short counts what demuxes."""
    av = _av()
    count = 0
    try:
        for packet in container.demux(container.streams.video[0]):
            count += 1 if packet.size else 0
    except (av.error.InvalidDataError, av.error.FFmpegError):
        pass
    return count


def _no_frames(path: Path, info: VideoInfo) -> str:
    claim = f"the container claims {info.frame_count}" if info.frame_count else "the container claims none"
    return f"{path}: decoded 0 video frames ({claim}); the file is truncated, empty or corrupt"


def _decode(container, path: Path, size, keep_index: set[int] | None = None, period: float | None = None,
            limit: int | None = None, max_decode: int | None = None) -> tuple[list[torch.Tensor], int]:
    """Decode the first video stream in order, keeping frames by index (`keep_index`), by
    presentation time (one per `period` seconds) or all; stop after `max_decode` frames.
    Corrupt data after at least one good frame ends the stream there (a truncated file); before
    any frame it raises ValueError. Returns (kept frames, frames decoded)."""
    av = _av()
    kept: list[torch.Tensor] = []
    decoded = 0
    next_time = 0.0
    start_time = None
    stream = container.streams.video[0]
    try:
        for frame in container.decode(stream):
            if max_decode is not None and decoded >= max_decode:
                break
            index, decoded = decoded, decoded + 1
            if keep_index is not None:
                take = index in keep_index
            elif period is not None:
                time = frame.time if frame.time is not None else index / float(stream.average_rate or 1)
                start_time = time if start_time is None else start_time
                elapsed = time - start_time
                take = elapsed >= next_time - 1e-6
                if take:  # the next multiple of the period after this frame (also skips longer gaps)
                    next_time = (math.floor((elapsed + 1e-6) / period) + 1) * period
            else:
                take = True
            if not take:
                continue
            if limit is not None and len(kept) >= limit:
                raise VideoTooLargeError(f"{path}: more frames decode than the container claimed, more than fit "
                                         f"the memory budget; {_fix_for_budget(limit, 1)}")
            if size is not None:
                rgb = frame.to_ndarray(format="rgb24", width=size[1], height=size[0], interpolation="BICUBIC")
            else:
                rgb = frame.to_ndarray(format="rgb24")
            kept.append(torch.from_numpy(rgb))  # [H, W, 3]
    except (av.error.InvalidDataError, av.error.FFmpegError) as err:
        if decoded == 0:
            raise ValueError(f"{path}: corrupt video data, no frame decodes ({err})") from err
        warnings.warn(f"{path}: corrupt or truncated video data after {decoded} frames; keeping those ({err})",
                      stacklevel=3)
    return kept, decoded
