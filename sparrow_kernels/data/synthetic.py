"""The synthetic video world of the tiny video LM: colored shapes on a plain background
that move, appear, change color and bounce off walls; their ground-truth facts, a
detailed caption and QA pairs built from the facts, and a parser that scores a caption.
Everything is a pure function of a seed; it must not import the model or the tokenizer.
A world is one continuous motion over normalized time t in [0, 1]: rendering it at more
frames samples the same motion more densely (a longer video of the same content).
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import torch

FRAME_SIZE = 32
OBJECT_HALF_SIZE = 4.0                      # objects are ~9 px across
CENTER_LOW, CENTER_HIGH = OBJECT_HALF_SIZE, FRAME_SIZE - OBJECT_HALF_SIZE   # walls for centers
BACKGROUND = (0.06, 0.06, 0.08)
COLORS = {
    "red": (0.95, 0.15, 0.10),
    "green": (0.10, 0.85, 0.20),
    "blue": (0.15, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.65, 0.20, 0.85),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 3
CAPTION_QUESTION = "describe the video in detail ."

# Every word the caption/QA grammar can produce; the tokenizer's vocabulary is built from it.
VOCABULARY_WORDS = tuple(dict.fromkeys(
    ["question:", "answer:", ".", ",", "?", "there", "is", "are", "object", "objects", "a",
     "the", "appears", "moves", "bounces", "turns", "describe", "video", "in", "detail",
     "how", "many", "what", "color", "shape", "which", "way", "does", "move", "bounce",
     "change", "appear", "later", "yes", "no", "it"]
    + list(NUMBER_WORDS) + list(COLORS) + list(SHAPES) + list(DIRECTIONS)))


@dataclass(frozen=True)
class ObjectTrack:
    """One object's continuous trajectory and events (times are normalized to [0, 1])."""

    color: str
    shape: str
    direction: str
    start: tuple[float, float]      # center (x, y) in pixels at t = 0
    displacement: float             # path length in pixels over t in [0, 1]
    appear_time: float              # 0.0: visible from the start
    bounce_time: float | None       # when it hits a wall and reverses (None: never)
    change_time: float | None       # when it changes color (None: never)
    new_color: str | None

    def centers(self, t: torch.Tensor) -> torch.Tensor:
        """Centers `[T, 2]` (x, y) at times `t [T]`, reflected once at a wall."""
        dx, dy = DIRECTIONS[self.direction]
        x = self.start[0] + dx * self.displacement * t
        y = self.start[1] + dy * self.displacement * t
        xy = torch.stack([x, y], dim=-1)                                   # [T, 2]
        xy = torch.where(xy > CENTER_HIGH, 2 * CENTER_HIGH - xy, xy)
        return torch.where(xy < CENTER_LOW, 2 * CENTER_LOW - xy, xy)

    def colors(self, t: torch.Tensor) -> torch.Tensor:
        """RGB `[T, 3]` at times `t [T]`."""
        before = torch.tensor(COLORS[self.color]).expand(len(t), 3)
        if self.change_time is None:
            return before
        after = torch.tensor(COLORS[self.new_color]).expand(len(t), 3)
        return torch.where((t >= self.change_time)[:, None], after, before)


@dataclass(frozen=True)
class ObjectFacts:
    color: str                      # initial color
    shape: str
    direction: str                  # initial direction of motion
    appears: bool                   # not visible at the start, appears later
    bounces: bool
    new_color: str | None           # color it turns into, if it changes


@dataclass(frozen=True)
class VideoFacts:
    objects: tuple[ObjectFacts, ...]    # in caption order

    @property
    def count(self) -> int:
        return len(self.objects)

    def fact_list(self) -> list[tuple]:
        """The scored facts: the count, and per object its color, shape, direction and
        each event that happens (appears, bounces, turns <color>)."""
        facts: list[tuple] = [("count", self.count)]
        for i, obj in enumerate(self.objects):
            facts += [(i, "color", obj.color), (i, "shape", obj.shape), (i, "direction", obj.direction)]
            if obj.appears:
                facts.append((i, "appears", True))
            if obj.bounces:
                facts.append((i, "bounces", True))
            if obj.new_color is not None:
                facts.append((i, "turns", obj.new_color))
        return facts


def _track_is_valid(track: ObjectTrack) -> bool:
    return all(CENTER_LOW - 1e-6 <= c <= CENTER_HIGH + 1e-6 for c in track.start)


def _make_track(rng: random.Random, color: str, shape: str, appear_time: float) -> ObjectTrack:
    direction = rng.choice(list(DIRECTIONS))
    displacement = rng.uniform(12.0, 16.0)
    dx, dy = DIRECTIONS[direction]
    bounce = rng.random() < 0.3 and appear_time < 0.55
    if bounce:
        # hit the wall at a time the object is visible, come back at least a few pixels
        bounce_time = rng.uniform(max(0.25, appear_time + 0.2), 0.75)
        to_wall = bounce_time * displacement
        along = CENTER_HIGH - to_wall if (dx + dy) > 0 else CENTER_LOW + to_wall
    else:
        bounce_time = None
        span = CENTER_HIGH - CENTER_LOW - displacement
        offset = rng.uniform(0.0, span)
        along = CENTER_LOW + offset if (dx + dy) > 0 else CENTER_HIGH - offset
    across = rng.uniform(CENTER_LOW, CENTER_HIGH)
    start = (along, across) if dx != 0 else (across, along)
    if rng.random() < 0.3:
        change_time = rng.uniform(max(0.35, appear_time + 0.15), 0.75)
        new_color = rng.choice([c for c in COLORS if c != color])
    else:
        change_time, new_color = None, None
    return ObjectTrack(color, shape, direction, start, displacement, appear_time,
                       bounce_time, change_time, new_color)


def _tracks_overlap(tracks: list[ObjectTrack], min_distance: float = 8.5) -> bool:
    t = torch.linspace(0.0, 1.0, 41)
    for a, b in itertools.combinations(tracks, 2):
        both = (t >= a.appear_time) & (t >= b.appear_time)
        dist = (a.centers(t) - b.centers(t)).norm(dim=-1)
        if bool((dist[both] < min_distance).any()):
            return True
    return False


class VideoWorld:
    """A procedurally generated video, deterministic from `seed`."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        rng = random.Random(self.seed)
        num_objects = rng.randint(1, MAX_OBJECTS)
        for _ in range(200):
            tracks = []
            # (color, shape) pairs are distinct so every object can be named in QA
            identities = rng.sample([(c, s) for c in COLORS for s in SHAPES], num_objects)
            for i, (color, shape) in enumerate(identities):
                late = i > 0 and rng.random() < 0.3 or (num_objects == 1 and rng.random() < 0.15)
                appear_time = round(rng.uniform(0.3, 0.55), 3) if late else 0.0
                tracks.append(_make_track(rng, color, shape, appear_time))
            if all(_track_is_valid(tr) for tr in tracks) and not _tracks_overlap(tracks):
                break
        else:  # pragma: no cover - rejection sampling practically always succeeds
            tracks = tracks[:1]
        # caption order: objects present from the start first (left to right, then top to
        # bottom), then late objects in order of appearance
        def order_key(tr: ObjectTrack):
            x, y = tr.centers(torch.tensor([tr.appear_time]))[0].tolist()
            return (tr.appear_time, round(x), round(y))
        self.tracks: tuple[ObjectTrack, ...] = tuple(sorted(tracks, key=order_key))

    @property
    def facts(self) -> VideoFacts:
        return VideoFacts(tuple(
            ObjectFacts(tr.color, tr.shape, tr.direction, tr.appear_time > 0,
                        tr.bounce_time is not None, tr.new_color) for tr in self.tracks))

    @property
    def caption(self) -> str:
        return caption_from_facts(self.facts)

    def qa_pairs(self) -> list[tuple[str, str]]:
        return qa_pairs_from_facts(self.facts)

    def times(self, num_frames: int) -> torch.Tensor:
        """Normalized times `[T]` of the frames of a `num_frames` rendering."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_frames == 1:
            return torch.zeros(1)
        return torch.linspace(0.0, 1.0, num_frames)

    def render(self, num_frames: int) -> torch.Tensor:
        """Frames `[T, 32, 32, 3]` uint8 of the same continuous motion sampled at
        `num_frames` evenly spaced times."""
        t = self.times(num_frames)                                           # [T]
        coords = torch.arange(FRAME_SIZE, dtype=torch.float32) + 0.5
        frames = torch.tensor(BACKGROUND).expand(len(t), FRAME_SIZE, FRAME_SIZE, 3).clone()
        for tr in self.tracks:
            xy = tr.centers(t)                                              # [T, 2]
            dx = coords[None, None, :] - xy[:, 0, None, None]               # [T, 1, W]
            dy = coords[None, :, None] - xy[:, 1, None, None]               # [T, H, 1]
            alpha = _shape_coverage(tr.shape, dx, dy)                        # [T, H, W]
            alpha = alpha * (t >= tr.appear_time).float()[:, None, None]
            color = tr.colors(t)[:, None, None, :]                           # [T, 1, 1, 3]
            frames = frames * (1 - alpha[..., None]) + color * alpha[..., None]
        return (frames * 255).round().clamp(0, 255).to(torch.uint8)


def _shape_coverage(shape: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of a shape centered at the origin."""
    h = OBJECT_HALF_SIZE
    if shape == "square":
        return (h + 0.5 - dx.abs()).clamp(0, 1) * (h + 0.5 - dy.abs()).clamp(0, 1)
    if shape == "circle":
        return (h + 1.0 - (dx * dx + dy * dy).sqrt()).clamp(0, 1)
    if shape == "triangle":   # apex up, flat base at the bottom
        half_width = (h + 0.5) * (dy + h + 0.5) / (2 * h + 1)
        inside = torch.minimum(h + 0.5 - dy, half_width + 0.5 - dx.abs())
        return inside.clamp(0, 1) * (dy + h + 1).clamp(0, 1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


# ----------------------------------------------------------------------------- text

def _object_sentence(obj: ObjectFacts) -> str:
    parts = [f"a {obj.color} {obj.shape}"]
    if obj.appears:
        parts.append("appears ,")
    parts.append(f"moves {obj.direction}")
    if obj.bounces:
        parts.append(", bounces")
    if obj.new_color is not None:
        parts.append(f", turns {obj.new_color}")
    return " ".join(parts) + " ."


def caption_from_facts(facts: VideoFacts) -> str:
    n = facts.count
    head = f"there is {NUMBER_WORDS[n]} object ." if n == 1 else f"there are {NUMBER_WORDS[n]} objects ."
    return " ".join([head] + [_object_sentence(obj) for obj in facts.objects])


def parse_caption(text: str) -> tuple[int | None, list[dict]]:
    """Read a (possibly wrong) caption back into (count, [object fields]). Unknown or
    malformed pieces are skipped; never raises on any text."""
    words = text.split()
    count = None
    for i, word in enumerate(words[:-1]):
        if word in ("is", "are") and words[i + 1] in NUMBER_WORDS:
            count = NUMBER_WORDS.index(words[i + 1])
            break
    objects = []
    sentences = " ".join(words).split(" . ")
    for sentence in sentences:
        toks = sentence.replace(" .", "").split()
        if len(toks) < 3 or toks[0] != "a":
            continue
        fields: dict = {"color": toks[1], "shape": toks[2], "appears": "appears" in toks,
                        "bounces": "bounces" in toks, "direction": None, "turns": None}
        for j, tok in enumerate(toks[:-1]):
            if tok == "moves":
                fields["direction"] = toks[j + 1]
            if tok == "turns":
                fields["turns"] = toks[j + 1]
        objects.append(fields)
    return count, objects


def _object_fact_hits(obj: ObjectFacts, pred: dict) -> tuple[int, int]:
    """(true facts of `obj` stated by `pred`, events `pred` claims that did not happen)."""
    hits = (pred["color"] == obj.color) + (pred["shape"] == obj.shape) + (pred["direction"] == obj.direction)
    hits += obj.appears and pred["appears"]
    hits += obj.bounces and pred["bounces"]
    hits += obj.new_color is not None and pred["turns"] == obj.new_color
    false = (pred["appears"] and not obj.appears) + (pred["bounces"] and not obj.bounces)
    false += obj.new_color is None and pred["turns"] is not None
    return int(hits), int(false)


def _claims(pred: dict) -> int:
    """Statements in a predicted object sentence (identity and motion, plus its events)."""
    return 3 + pred["appears"] + pred["bounces"] + (pred["turns"] is not None)


def score_caption(text: str, facts: VideoFacts) -> tuple[int, int]:
    """(facts stated correctly, facts total). The total is the ground-truth facts plus every
    false statement of the caption (an event that did not happen, the statements of an
    object that does not exist), so a caption cannot score by claiming everything.
    Predicted object sentences are matched to ground-truth objects by the assignment with
    the best (correct - false) balance, so order does not matter. Never raises."""
    count, predicted = parse_caption(text)
    predicted = predicted[:8]
    total = len(facts.fact_list())
    correct = int(count == facts.count)
    gt = list(facts.objects)
    slots = predicted + [None] * max(0, len(gt) - len(predicted))
    best = None
    for perm in itertools.permutations(range(len(slots)), len(gt)):
        hits = false = 0
        for obj, j in zip(gt, perm):
            if slots[j] is not None:
                h, f = _object_fact_hits(obj, slots[j])
                hits, false = hits + h, false + f
        used = set(perm)
        false += sum(_claims(p) for j, p in enumerate(predicted) if j not in used)
        if best is None or hits - false > best[0] - best[1]:
            best = (hits, false)
    hits, false = best
    return correct + hits, total + false


def qa_pairs_from_facts(facts: VideoFacts) -> list[tuple[str, str]]:
    """Questions with one short correct answer each, built from the facts."""
    n = facts.count
    pairs = [("how many objects are there ?", NUMBER_WORDS[n])]
    shapes = [o.shape for o in facts.objects]
    colors = [o.color for o in facts.objects]
    for obj in facts.objects:
        name = f"the {obj.color} {obj.shape}"
        if shapes.count(obj.shape) == 1:
            pairs.append((f"what color is the {obj.shape} ?", obj.color))
        if colors.count(obj.color) == 1:
            pairs.append((f"what shape is the {obj.color} object ?", obj.shape))
        pairs.append((f"which way does {name} move ?", obj.direction))
        pairs.append((f"does {name} bounce ?", "yes" if obj.bounces else "no"))
        pairs.append((f"does {name} appear later ?", "yes" if obj.appears else "no"))
        pairs.append((f"does {name} change color ?",
                      f"yes , it turns {obj.new_color}" if obj.new_color else "no"))
    return pairs


def question_text(question: str) -> str:
    """The prompt text the tiny VLM is trained on for one question."""
    return f"question: {question} answer:"


def caption_prompt_text() -> str:
    return question_text(CAPTION_QUESTION)


def heldout_seed(index: int) -> int:
    """Seeds reserved for evaluation; training draws seeds below 10**9."""
    return 10**9 + int(index)


def _self_check() -> None:  # cheap sanity used by tests
    w = VideoWorld(0)
    assert score_caption(w.caption, w.facts) == (len(w.facts.fact_list()),) * 2
    assert math.isfinite(float(w.render(3).float().mean()))
