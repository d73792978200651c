"""The narrated video world: 2-5 colored shapes that move in piecewise-straight lines, appear,
disappear, change color, shape, direction and speed, over a clip of a few seconds. A world is a
pure function of its seed: a time-ordered event log (the ground truth) and frames rendered at any
resolution and frame count from the same continuous motion. It must not produce text (narration.py
does) nor import models, tokenizers or training code.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

COLORS = {
    "red": (0.95, 0.15, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.15, 0.35, 1.00),
    "purple": (0.60, 0.20, 0.85),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("square", "circle", "triangle", "diamond", "cross")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = {"slow": 0.055, "fast": 0.12}         # normalized frame widths per second
EVENT_KINDS = ("appear", "disappear", "color", "shape", "direction", "speed")
BACKGROUND = (0.07, 0.07, 0.09)
HALF_SIZE = 0.075                              # object half size, in frame heights
LOW, HIGH = HALF_SIZE, 1.0 - HALF_SIZE         # walls for centers (normalized)
MIN_EVENT_GAP = 0.6                            # seconds between any two events of a world
MIN_DISTANCE = 2.6 * HALF_SIZE                 # centers of two visible objects never come closer


@dataclass(frozen=True)
class Segment:
    """Straight motion of one object from `start` (seconds) until the next segment."""

    start: float
    position: tuple[float, float]      # center (x, y) at `start`, normalized, y down
    direction: str
    speed: str

    def at(self, t: np.ndarray) -> np.ndarray:
        """Centers `[T, 2]` at times `t [T]` (seconds, >= start)."""
        dx, dy = DIRECTIONS[self.direction]
        d = (t - self.start) * SPEEDS[self.speed]
        return np.stack([self.position[0] + dx * d, self.position[1] + dy * d], axis=-1)


@dataclass(frozen=True)
class Event:
    """One change in the world. `value` is the new color / shape / direction / speed ("fast" or
    "slow"); None for appear and disappear. `name` is the object's "<color> <shape>" just before
    the event (at the event for appear)."""

    time: float
    kind: str
    obj: int
    value: str | None
    name: str


@dataclass(frozen=True)
class WorldObject:
    color: str                          # at its first visible moment
    shape: str
    appear: float                       # seconds; 0.0 = visible from the start
    disappear: float | None             # seconds; None = visible until the end
    segments: tuple[Segment, ...]
    color_change: tuple[float, str] | None = None
    shape_change: tuple[float, str] | None = None

    def visible(self, t: np.ndarray) -> np.ndarray:
        end = math.inf if self.disappear is None else self.disappear
        return (t >= self.appear) & (t < end)

    def centers(self, t: np.ndarray) -> np.ndarray:
        """Centers `[T, 2]` at times `t [T]` (before `appear`, the first segment's start)."""
        t = np.clip(np.asarray(t, dtype=np.float64), self.segments[0].start, None)
        out = np.zeros((len(t), 2))
        for i, seg in enumerate(self.segments):
            end = self.segments[i + 1].start if i + 1 < len(self.segments) else math.inf
            sel = (t >= seg.start) & (t < end)
            out[sel] = seg.at(t[sel])
        return out

    def color_at(self, t: float) -> str:
        if self.color_change is not None and t >= self.color_change[0]:
            return self.color_change[1]
        return self.color

    def shape_at(self, t: float) -> str:
        if self.shape_change is not None and t >= self.shape_change[0]:
            return self.shape_change[1]
        return self.shape

    def name_at(self, t: float) -> str:
        return f"{self.color_at(t)} {self.shape_at(t)}"

    def segment_at(self, t: float) -> Segment:
        return [s for s in self.segments if s.start <= t][-1] if t >= self.segments[0].start else self.segments[0]

    @property
    def names(self) -> set[str]:
        """Every "<color> <shape>" this object ever shows."""
        colors = {self.color} | ({self.color_change[1]} if self.color_change else set())
        shapes = {self.shape} | ({self.shape_change[1]} if self.shape_change else set())
        return {f"{c} {s}" for c in colors for s in shapes}


def region_words(x: float, y: float) -> str:
    """Where a point lies in a 3 x 3 split of the frame ("top left", "center", "bottom", ...)."""
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    return " ".join(w for w in (row, col) if w) or "center"


def _plan_segments(rng: random.Random, start: float, end: float, changes: int) -> tuple[Segment, ...] | None:
    """Random straight segments over [start, end] that keep the center inside the walls."""
    times = [start]
    for _ in range(changes):
        lo = times[-1] + 1.5
        if lo > end - 1.0:
            break
        times.append(rng.uniform(lo, min(end - 1.0, lo + (end - start) / max(1, changes))))
    x, y = rng.uniform(LOW, HIGH), rng.uniform(LOW, HIGH)
    segments: list[Segment] = []
    for i, t0 in enumerate(times):
        t1 = times[i + 1] if i + 1 < len(times) else end
        prev = segments[-1] if segments else None
        options = []
        for direction in DIRECTIONS:
            for speed in SPEEDS:
                if prev is not None and (direction, speed) == (prev.direction, prev.speed):
                    continue
                if prev is not None and direction != prev.direction and speed != prev.speed:
                    continue            # one change at a time: direction or speed
                dx, dy = DIRECTIONS[direction]
                d = (t1 - t0) * SPEEDS[speed]
                if LOW <= x + dx * d <= HIGH and LOW <= y + dy * d <= HIGH:
                    options.append((direction, speed))
        if not options:
            return None
        direction, speed = rng.choice(options)
        segments.append(Segment(round(t0, 3), (x, y), direction, speed))
        dx, dy = DIRECTIONS[direction]
        d = (t1 - t0) * SPEEDS[speed]
        x, y = x + dx * d, y + dy * d
    return tuple(segments)


@dataclass
class World:
    """A procedurally generated clip, deterministic from `seed`. `objects` are ordered by when they
    first appear, then left to right; `events` is the time-ordered log of changes."""

    seed: int
    duration: float = field(init=False)
    objects: tuple[WorldObject, ...] = field(init=False)

    def __post_init__(self):
        rng = random.Random(int(self.seed) * 7919 + 17)
        self.duration = rng.choice((8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0))
        wanted = rng.choices((2, 3, 4, 5, 6), weights=(1, 2, 3, 4, 3))[0]
        objects: list[WorldObject] = []
        for index in range(wanted):
            for _ in range(60):
                candidate = self._random_object(rng, index)
                if candidate is not None and self._fits(candidate, objects):
                    objects.append(candidate)
                    break
        objects.sort(key=lambda o: (o.appear, round(float(o.centers(np.array([o.appear]))[0, 0]), 3)))
        self.objects = tuple(objects)

    # ------------------------------------------------------------------ generation
    def _random_object(self, rng: random.Random, index: int) -> WorldObject | None:
        D = self.duration
        late = index > 0 and rng.random() < 0.3
        appear = round(rng.uniform(0.15 * D, 0.6 * D), 2) if late else 0.0
        disappear = None
        if index > 0 and rng.random() < 0.22 and appear + 3.0 < D - 1.0:   # one object stays to the end
            disappear = round(rng.uniform(appear + 3.0, D - 1.0), 2)
        end = D if disappear is None else disappear
        segments = _plan_segments(rng, appear, end, rng.choice((0, 1, 2, 2, 3, 3, 4, 4)))
        if segments is None:
            return None
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        color_change = shape_change = None
        if rng.random() < 0.35 and end - appear > 2.5:
            color_change = (round(rng.uniform(appear + 1.0, end - 1.0), 2),
                            rng.choice([c for c in COLORS if c != color]))
        if rng.random() < 0.2 and end - appear > 2.5:
            shape_change = (round(rng.uniform(appear + 1.0, end - 1.0), 2),
                            rng.choice([s for s in SHAPES if s != shape]))
        return WorldObject(color, shape, appear, disappear, segments, color_change, shape_change)

    def _fits(self, new: WorldObject, placed: list[WorldObject]) -> bool:
        if any(new.names & o.names for o in placed):
            return False                                   # every name points to one object
        own = sorted(e.time for e in _object_events(new, -1))
        if any(b - a < MIN_EVENT_GAP for a, b in zip(own, own[1:])):
            return False
        times = [e.time for o in placed for e in _object_events(o, -1)]
        if any(abs(a - b) < MIN_EVENT_GAP for a in own for b in times):
            return False
        t = np.arange(0.0, self.duration, 0.05)
        for o in placed:
            both = new.visible(t) & o.visible(t)
            if both.any():
                dist = np.linalg.norm(new.centers(t[both]) - o.centers(t[both]), axis=-1)
                if (dist < MIN_DISTANCE).any():
                    return False
        return True

    # ------------------------------------------------------------------ ground truth
    @property
    def events(self) -> list[Event]:
        """The time-ordered event log (appearances after t = 0, disappearances, changes)."""
        events = [e for i, o in enumerate(self.objects) for e in _object_events(o, i)]
        return sorted(events, key=lambda e: (e.time, e.obj))

    def visible_objects(self, t: float) -> list[int]:
        return [i for i, o in enumerate(self.objects) if bool(o.visible(np.array([t]))[0])]

    def count_at(self, t: float) -> int:
        return len(self.visible_objects(t))

    @property
    def start_objects(self) -> list[int]:
        return [i for i, o in enumerate(self.objects) if o.appear == 0.0]

    @property
    def end_objects(self) -> list[int]:
        return [i for i, o in enumerate(self.objects) if o.disappear is None]

    def object_of_name(self, name: str) -> int | None:
        for i, o in enumerate(self.objects):
            if name in o.names:
                return i
        return None

    # ------------------------------------------------------------------ pixels
    def frame_times(self, num_frames: int) -> np.ndarray:
        """Seconds `[T]` of the frames of a `num_frames` rendering: the centers of T equal slices."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        return (np.arange(num_frames) + 0.5) * self.duration / num_frames

    def fps(self, num_frames: int) -> float:
        return num_frames / self.duration

    def render(self, num_frames: int, height: int = 112, width: int | None = None,
               chunk: int = 32) -> np.ndarray:
        """Frames `[T, H, W, 3]` uint8 of the same continuous motion sampled at `num_frames`
        evenly spaced times, at any resolution (sizes are relative to the frame height)."""
        width = height if width is None else width
        if height < 8 or width < 8:
            raise ValueError(f"height and width must be >= 8 pixels, got {height}x{width}")
        times = self.frame_times(num_frames)
        out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
        ys = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
        xs = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :]
        half = HALF_SIZE * height
        for c0 in range(0, num_frames, chunk):
            t = times[c0:c0 + chunk]
            frames = np.empty((len(t), height, width, 3), dtype=np.float32)
            frames[:] = BACKGROUND
            for o in self.objects:
                vis = o.visible(t)
                if not vis.any():
                    continue
                xy = o.centers(t).astype(np.float32)
                dx = xs - (xy[:, 0] * width)[:, None, None]                 # [t, 1, W]
                dy = ys - (xy[:, 1] * height)[:, None, None]                # [t, H, 1]
                for k in np.nonzero(vis)[0]:
                    tk = float(t[k])
                    alpha = _coverage(o.shape_at(tk), dx[k], dy[k], half)[..., None]   # [H, W, 1]
                    frames[k] = frames[k] * (1 - alpha) + np.asarray(COLORS[o.color_at(tk)], np.float32) * alpha
            out[c0:c0 + chunk] = np.clip(np.rint(frames * 255), 0, 255).astype(np.uint8)
        return out


def _object_events(o: WorldObject, index: int) -> list[Event]:
    events = []
    if o.appear > 0:
        events.append(Event(o.appear, "appear", index, None, f"{o.color} {o.shape}"))
    if o.disappear is not None:
        events.append(Event(o.disappear, "disappear", index, None, o.name_at(o.disappear)))
    if o.color_change is not None:
        t, c = o.color_change
        events.append(Event(t, "color", index, c, o.name_at(t - 1e-6)))
    if o.shape_change is not None:
        t, s = o.shape_change
        events.append(Event(t, "shape", index, s, o.name_at(t - 1e-6)))
    for prev, seg in zip(o.segments, o.segments[1:]):
        if seg.direction != prev.direction:
            events.append(Event(seg.start, "direction", index, seg.direction, o.name_at(seg.start - 1e-6)))
        else:
            events.append(Event(seg.start, "speed", index, seg.speed, o.name_at(seg.start - 1e-6)))
    return events


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape of half size `h` pixels centered at the origin."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "square":
        return np.clip(h + 0.5 - ax, 0, 1) * np.clip(h + 0.5 - ay, 0, 1)
    if shape == "circle":
        return np.clip(h + 0.5 - np.sqrt(dx * dx + dy * dy), 0, 1)
    if shape == "diamond":
        return np.clip((1.25 * h + 0.5 - (ax + ay)) * 0.75, 0, 1)
    if shape == "cross":
        bar = 0.38 * h
        horizontal = np.clip(h + 0.5 - ax, 0, 1) * np.clip(bar + 0.5 - ay, 0, 1)
        vertical = np.clip(bar + 0.5 - ax, 0, 1) * np.clip(h + 0.5 - ay, 0, 1)
        return np.maximum(horizontal, vertical)
    if shape == "triangle":   # apex up, flat base at the bottom
        half_width = (h + 0.5) * (dy + h + 0.5) / (2 * h + 1)
        inside = np.minimum(h + 0.5 - dy, half_width + 0.5 - ax)
        return np.clip(inside, 0, 1) * np.clip(dy + h + 1, 0, 1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def heldout_world_seed(index: int) -> int:
    """Seeds reserved for evaluation; training draws seeds below 10**9."""
    return 10**9 + int(index)
