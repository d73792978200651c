"""Natural-English text about a narrated world (world.py): prompts and answers for a detailed
narration, a short summary and four question kinds (color at a time, count, order of two events,
direction), with several phrasings per statement, optional clauses and approximate timestamps;
and fact scoring: reading any answer text back against the world's event log, per fact kind.
Pure text code: it must not render pixels, tokenize, or import models.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from .world import COLORS, DIRECTIONS, SHAPES, Event, World, region_words

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PROMPT_KINDS = ("narration", "summary", "color_at", "count", "order", "direction")
QUESTION_KINDS = ("color_at", "count", "order", "direction")
NARRATION_FACT_KINDS = ("objects", "count", "appear", "disappear", "color", "shape", "direction", "speed",
                        "order")
SUMMARY_FACT_KINDS = ("count", "appear", "disappear", "color", "shape")

NARRATION_PROMPTS = (
    "Describe the video in detail.",
    "Describe the video.",
    "Narrate what happens in this video from start to finish.",
    "What happens in this video? Give a detailed account.",
    "Give a detailed description of the video, in order.",
    "Tell me everything that happens in the video.",
)
SUMMARY_PROMPTS = (
    "Summarize the video in one sentence.",
    "Give a short summary of the video.",
    "Briefly, what happens in this video?",
)


def _time(t: float) -> str:
    """An approximate timestamp: the nearest half second, written like "3.5" or "4"."""
    r = round(t * 2) / 2
    return f"{r:g}"


def _seconds(t: float) -> str:
    """ "about {this}": "1 second", "3.5 seconds"."""
    r = _time(t)
    return f"{r} second" if r == "1" else f"{r} seconds"


def _count(n: int, noun: str = "object") -> str:
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{word} {noun}" + ("" if n == 1 else "s")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _where(x: float, y: float, rng: random.Random) -> str:
    region = region_words(x, y)
    if region == "center":
        return rng.choice(("in the middle of the frame", "near the center", "in the center"))
    if " " in region:
        return rng.choice((f"in the {region} corner", f"near the {region} corner", f"in the {region}"))
    return rng.choice((f"near the {region} edge", f"on the {region} side", f"toward the {region}"))


def _manner(speed: str, rng: random.Random) -> str:
    if speed == "slow":
        return rng.choice(("slowly", "at a slow pace", "slowly"))
    return rng.choice(("quickly", "fast", "at a quick pace"))


def _motion(direction: str, speed: str, rng: random.Random) -> str:
    verb = rng.choice(("moving", "heading", "drifting" if speed == "slow" else "moving"))
    return f"{verb} {direction} {_manner(speed, rng)}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------- narration

def _opening(world: World, rng: random.Random) -> str:
    n = len(world.start_objects)
    d = _time(world.duration)
    options = (
        f"The video is about {d} seconds long and shows {_count(n)} on a dark background.",
        f"This clip lasts roughly {d} seconds. At the start, {_count(n)} can be seen against a dark background.",
        f"In this video of about {d} seconds, {_count(n, 'shape')} move across a dark background at first.",
        f"The clip runs for about {d} seconds, and it begins with {_count(n)} on a dark background.",
    )
    if n == 1:
        options = options[:2] + options[3:]
    return rng.choice(options)


def _introduce(world: World, i: int, rng: random.Random) -> str:
    o = world.objects[i]
    seg = o.segments[0]
    x, y = seg.position
    name = f"{o.color} {o.shape}"
    where = _where(x, y, rng)
    options = (
        f"There is {_article(name)} {name} {where}, {_motion(seg.direction, seg.speed, rng)}.",
        f"{_cap(_article(name))} {name} starts {where} and moves {seg.direction} {_manner(seg.speed, rng)}.",
        f"{_cap(where)}, {_article(name)} {name} is {_motion(seg.direction, seg.speed, rng)}.",
        f"One of them is {_article(name)} {name}; it begins {where} and travels {seg.direction} "
        f"{_manner(seg.speed, rng)}.",
    )
    return rng.choice(options)


def _when(e: Event, prev: Event | None, rng: random.Random) -> str:
    t = _time(e.time)
    if prev is not None and e.time - prev.time < 1.2 and rng.random() < 0.5:
        return rng.choice(("Shortly after, ", "Right after that, ", "Moments later, ", "Soon after, "))
    s = _seconds(e.time)
    return rng.choice((f"At about {s}, ", f"Around the {t} second mark, ", f"At roughly {s}, ",
                       f"About {s} in, ", f"At around {s}, "))


def _event_clause(world: World, e: Event, rng: random.Random) -> str:
    """The statement of one event (lower-case start, no time phrase, ends with a period)."""
    o = world.objects[e.obj]
    name = e.name
    if e.kind == "appear":
        seg = o.segments[0]
        where = _where(*seg.position, rng)
        clause = rng.choice((
            f"{_article(name)} {name} appears {where} and starts {_motion(seg.direction, seg.speed, rng)}",
            f"a new object, {_article(name)} {name}, comes into view {where}, {_motion(seg.direction, seg.speed, rng)}",
            f"{_article(name)} {name} shows up {where}; it moves {seg.direction} {_manner(seg.speed, rng)}",
        ))
    elif e.kind == "disappear":
        clause = rng.choice((f"the {name} disappears", f"the {name} vanishes from the scene",
                             f"the {name} disappears from view", f"the {name} is suddenly gone"))
        if rng.random() < 0.4:
            left = world.count_at(e.time + 1e-3)
            clause += rng.choice((f", leaving {_count(left)} on screen", f", so only {_count(left)} remain"
                                  if left != 1 else f", so only one object remains"))
    elif e.kind == "color":
        clause = rng.choice((f"the {name} turns {e.value}", f"the {name} changes color from {o.color_at(e.time - 1e-6)} "
                             f"to {e.value}", f"the {name} becomes {e.value}", f"the {name} switches its color to {e.value}"))
    elif e.kind == "shape":
        clause = rng.choice((f"the {name} turns into {_article(e.value)} {e.value}",
                             f"the {name} changes shape and becomes {_article(e.value)} {e.value}",
                             f"the {name} morphs into {_article(e.value)} {e.value}"))
    elif e.kind == "direction":
        seg = o.segment_at(e.time)
        clause = rng.choice((f"the {name} changes direction and now moves {e.value}",
                             f"the {name} turns and heads {e.value}",
                             f"the {name} switches direction and starts moving {e.value}"))
        if rng.random() < 0.3:
            clause += f", still {_manner(seg.speed, rng)}"
    elif e.kind == "speed":
        clause = rng.choice((f"the {name} speeds up", f"the {name} starts moving faster",
                             f"the {name} picks up speed") if e.value == "fast" else
                            (f"the {name} slows down", f"the {name} starts moving more slowly",
                             f"the {name} loses speed"))
        if rng.random() < 0.4:
            clause += rng.choice((f" while it keeps going {o.segment_at(e.time).direction}",
                                  f" but keeps heading {o.segment_at(e.time).direction}"))
    else:  # pragma: no cover - kinds are fixed by world.py
        raise ValueError(f"unknown event kind {e.kind!r}")
    if e.kind in ("color", "shape") and rng.random() < 0.6:
        seg = o.segment_at(e.time)
        clause += rng.choice((f" while it keeps moving {seg.direction}", f" as it continues on its way {seg.direction}",
                              f", without changing its course"))
    return clause + "."


def _ending(world: World, rng: random.Random) -> str:
    end = world.end_objects
    if not end:
        return "By the end of the video, nothing is left on screen."
    names = [world.objects[i].name_at(world.duration) for i in end]
    listed = ", ".join(f"{_article(n)} {n}" for n in names[:-1])
    listed = f"{listed} and {_article(names[-1])} {names[-1]}" if listed else f"{_article(names[0])} {names[0]}"
    return rng.choice((
        f"By the end of the video, {_count(len(end))} remain: {listed}.",
        f"When the video ends, there are {_count(len(end))} on screen: {listed}.",
        f"At the end, {_count(len(end))} are left: {listed}.",
    )) if len(end) > 1 else rng.choice((
        f"By the end of the video, only one object remains: {listed}.",
        f"When the video ends, there is one object on screen: {listed}.",
    ))


def _recap(world: World, t: float, rng: random.Random) -> str:
    """A sentence listing what is on screen right after time t (where and how each object moves)."""
    pieces = []
    for i in world.visible_objects(t):
        o = world.objects[i]
        x, y = o.centers([t])[0]
        pieces.append(f"the {o.name_at(t)} {_where(x, y, rng)}")
    listed = ", ".join(pieces[:-1]) + (f" and {pieces[-1]}" if len(pieces) > 1 else pieces[-1])
    return rng.choice((f"At this point, the screen shows {listed}.", f"So far, we can see {listed}.",
                       f"Now the scene contains {listed}."))


def narration(world: World, rng: random.Random | None = None) -> str:
    """A detailed, time-ordered narration of the whole clip."""
    rng = rng or random.Random(world.seed)
    parts = [_opening(world, rng)]
    parts += [_introduce(world, i, rng) for i in world.start_objects]
    if not world.events:
        parts.append(rng.choice(("Nothing else changes: the objects keep moving the same way until the end.",
                                 "After that, nothing changes; every object keeps its color, shape and course.")))
    prev = None
    for k, e in enumerate(world.events):
        clause = _event_clause(world, e, rng)
        parts.append(_when(e, prev, rng) + clause)
        prev = e
        if k % 3 == 2 and k + 1 < len(world.events) and rng.random() < 0.95:
            parts.append(_recap(world, e.time + 1e-3, rng))
    parts.append(_ending(world, rng))
    return " ".join(parts)


def summary(world: World, rng: random.Random | None = None) -> str:
    """One sentence: the count and the salient events (up to five appear/disappear/color/shape)."""
    rng = rng or random.Random(world.seed)
    n = len(world.start_objects)
    pieces = []
    for e in _summary_events(world):
        if e.kind == "appear":
            pieces.append(f"{_article(e.name)} {e.name} appears")
        elif e.kind == "disappear":
            pieces.append(f"the {e.name} disappears")
        elif e.kind == "color":
            pieces.append(f"the {e.name} turns {e.value}")
        else:
            pieces.append(f"the {e.name} turns into {_article(e.value)} {e.value}")
    head = rng.choice((f"{_cap(_count(n))} move around a dark background",
                       f"A clip of about {_seconds(world.duration)} with {_count(n)} moving around",
                       f"{_cap(_count(n, 'shape'))} move across the frame")) if n > 1 else \
        rng.choice(("One object moves around a dark background",
                    f"A clip of about {_seconds(world.duration)} with one object moving around"))
    if not pieces:
        return head + rng.choice((", and nothing else changes.", " without any other change."))
    events = ", ".join(pieces[:-1]) + (f" and {pieces[-1]}" if len(pieces) > 1 else pieces[-1])
    return f"{head}; {events}."


def _summary_events(world: World) -> list[Event]:
    return [e for e in world.events if e.kind in ("appear", "disappear", "color", "shape")][:5]


# ----------------------------------------------------------------------------- questions

@dataclass(frozen=True)
class QA:
    kind: str          # one of QUESTION_KINDS
    question: str
    answer: str
    truth: str         # the scored value: a color, a number word, a name (who came first), a direction


def _reference(world: World, i: int, t: float) -> str:
    """A way to name object i in a question about time t that names it uniquely."""
    return f"the {world.objects[i].name_at(t)}"


def _quiet_times(world: World, rng: random.Random, margin: float = 0.8) -> list[float]:
    """Candidate times at least `margin` seconds away from every event and the clip's ends."""
    times = [e.time for e in world.events]
    grid = [x / 2 for x in range(2, int(world.duration * 2) - 1)]
    return [t for t in grid if all(abs(t - s) >= margin for s in times)]


def _quiet_moment(world: World, rng: random.Random) -> tuple[float, list[int]] | None:
    """A random quiet time and the objects visible then (None when there is no such moment)."""
    times = _quiet_times(world, rng)
    if not times:
        return None
    t = rng.choice(times)
    visible = world.visible_objects(t)
    return (t, visible) if visible else None


def question_color_at(world: World, rng: random.Random) -> QA | None:
    moment = _quiet_moment(world, rng)
    if moment is None:
        return None
    t, visible = moment
    changing = [i for i, o in enumerate(world.objects) if o.color_change is not None]
    pool = [i for i in visible if i in changing] or visible
    i = rng.choice(pool)
    o = world.objects[i]
    shape = o.shape_at(t)
    same_shape = [j for j in visible if world.objects[j].shape_at(t) == shape]
    ref = f"the {shape}" if len(same_shape) == 1 else None
    if ref is None:
        return None
    color = o.color_at(t)
    q = rng.choice((f"What color is {ref} at about {_seconds(t)}?",
                    f"At around {_seconds(t)}, what color is {ref}?",
                    f"Which color does {ref} have at roughly {_seconds(t)}?"))
    a = rng.choice((f"At about {_seconds(t)}, {ref} is {color}.", f"It is {color} at that point.",
                    f"{_cap(ref)} is {color} then."))
    if o.color_change is not None and rng.random() < 0.5:
        tc, new = o.color_change
        a += (f" It turns {new} at about {_seconds(tc)}." if tc > t else
              f" It was {o.color} before about {_seconds(tc)}.")
    return QA("color_at", q, a, color)


def question_count(world: World, rng: random.Random) -> QA:
    choice = rng.random()
    if choice < 0.3:
        n = len(world.start_objects)
        q = rng.choice(("How many objects are there at the start of the video?",
                        "How many shapes can be seen when the video begins?"))
        where = "at the start"
    elif choice < 0.55:
        n = len(world.end_objects)
        q = rng.choice(("How many objects are left at the end of the video?",
                        "How many shapes are on screen when the video ends?"))
        where = "at the end"
    else:
        times = _quiet_times(world, rng) or [world.duration / 2]
        t = rng.choice(times)
        n = world.count_at(t)
        q = rng.choice((f"How many objects are visible at about {_seconds(t)}?",
                        f"At around {_seconds(t)}, how many shapes are on screen?"))
        where = f"at about {_seconds(t)}"
    word = NUMBER_WORDS[n]
    a = rng.choice((f"There {'is' if n == 1 else 'are'} {_count(n)} {where}.", f"{_cap(word)}.",
                    f"I count {_count(n)} {where}."))
    return QA("count", q, a, word)


def _event_phrase(e: Event, gerund: bool) -> str:
    if e.kind == "appear":
        return f"the {e.name} appearing" if gerund else f"the {e.name} appears"
    if e.kind == "disappear":
        return f"the {e.name} disappearing" if gerund else f"the {e.name} disappears"
    if e.kind == "color":
        return f"the {e.name} turning {e.value}" if gerund else f"the {e.name} turns {e.value}"
    if e.kind == "shape":
        return (f"the {e.name} turning into {_article(e.value)} {e.value}" if gerund
                else f"the {e.name} turns into {_article(e.value)} {e.value}")
    if e.kind == "direction":
        return f"the {e.name} turning {e.value}" if gerund else f"the {e.name} turns {e.value}"
    return (f"the {e.name} {'speeding up' if gerund else 'speeds up'}" if e.value == "fast"
            else f"the {e.name} {'slowing down' if gerund else 'slows down'}")


def question_order(world: World, rng: random.Random) -> QA | None:
    events = world.events
    pairs = [(a, b) for k, a in enumerate(events) for b in events[k + 1:]
             if a.obj != b.obj and b.time - a.time >= 1.0]
    if not pairs:
        return None
    first, second = rng.choice(pairs)
    x, y = (first, second) if rng.random() < 0.5 else (second, first)
    q = rng.choice((f"Which happens first: {_event_phrase(x, True)} or {_event_phrase(y, True)}?",
                    f"What comes first, {_event_phrase(x, True)} or {_event_phrase(y, True)}?",
                    f"Does {_event_phrase(x, True)} happen before "
                    f"{_event_phrase(y, True)}?"))
    a = rng.choice((f"{_cap(_event_phrase(first, True))} comes first, at about {_seconds(first.time)}; "
                    f"{_event_phrase(second, True)} follows at about {_seconds(second.time)}.",
                    f"First {_event_phrase(first, False)}, at about {_seconds(first.time)}, and later "
                    f"{_event_phrase(second, False)}.",
                    f"{_cap(_event_phrase(first, False))} first."))
    return QA("order", q, a, first.name)


def question_direction(world: World, rng: random.Random) -> QA | None:
    moment = _quiet_moment(world, rng)
    if moment is None:
        return None
    t, visible = moment
    i = rng.choice(visible)
    o = world.objects[i]
    seg = o.segment_at(t)
    ref = _reference(world, i, t)
    q = rng.choice((f"Which way is {ref} moving at about {_seconds(t)}?",
                    f"In which direction does {ref} move around {_seconds(t)}?",
                    f"At roughly {_seconds(t)}, where is {ref} heading?"))
    a = rng.choice((f"It is moving {seg.direction}.", f"{_cap(ref)} is heading {seg.direction} at that time.",
                    f"At about {_seconds(t)}, {ref} moves {seg.direction}, {_manner(seg.speed, rng)}."))
    return QA("direction", q, a, seg.direction)


QUESTION_MAKERS = {"color_at": question_color_at, "count": question_count, "order": question_order,
                   "direction": question_direction}


def make_question(world: World, kind: str, rng: random.Random, tries: int = 8) -> QA | None:
    """One question of `kind` about `world` (None when the world has no good question of it)."""
    if kind not in QUESTION_MAKERS:
        raise ValueError(f"kind must be one of {QUESTION_KINDS}, got {kind!r}")
    for _ in range(tries):
        qa = QUESTION_MAKERS[kind](world, rng)
        if qa is not None:
            return qa
    return None


# ----------------------------------------------------------------------------- scoring

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_NAME_RE = re.compile(rf"\b({_COLOR}) ({_SHAPE})\b")
_NUMBER_RE = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r"|\d+)\b")
_DIRECTION_RE = re.compile(r"\b(" + "|".join(DIRECTIONS) + r")\b")
_TIME_RE = re.compile(r"(\d+(?:\.\d+)?) second")


def _number(word: str) -> int:
    return NUMBER_WORDS.index(word) if word in NUMBER_WORDS else int(word)


@dataclass
class _Claim:
    kind: str
    obj: int | None
    value: str | None
    position: int       # character offset in the text (for order)
    change: bool = True  # a change event (False: a direction or speed stated as a state)


def _sentence_claims(world: World, sentence: str, offset: int) -> list[_Claim]:
    s = sentence.lower()
    names = [(m.group(0), m.start()) for m in _NAME_RE.finditer(s)]
    claims: list[_Claim] = []
    if len(names) != 1:
        for name, pos in names:
            claims.append(_Claim("objects", world.object_of_name(name), name, offset + pos))
        return claims
    name, pos = names[0]
    obj = world.object_of_name(name)
    at = offset + pos
    claims.append(_Claim("objects", obj, name, at))
    rest = s[:pos] + " " * len(name) + s[pos + len(name):]
    if re.search(r"\b(appears|comes into view|shows up)\b", rest):
        claims.append(_Claim("appear", obj, None, at))
    if re.search(r"\b(disappears|vanishes|is suddenly gone|disappearing)\b", rest):
        claims.append(_Claim("disappear", obj, None, at))
    shape_change = re.search(rf"\b(?:into|becomes) an? ({_SHAPE})\b", rest)
    if shape_change:
        claims.append(_Claim("shape", obj, shape_change.group(1), at))
    color_change = re.search(rf"\b(?:turns|becomes|to|turning) ({_COLOR})\b", rest)
    if color_change:
        claims.append(_Claim("color", obj, color_change.group(1), at))
    changes_course = bool(re.search(r"\b(direction|turns and heads|turning (?:left|right|up|down))\b", rest))
    if re.search(r"\b(speeds up|faster|picks up speed|speeding up)\b", rest):
        claims.append(_Claim("speed", obj, "fast", at))
        rest = re.sub(r"\b(speeds up|faster|picks up speed|speeding up)\b", " ", rest)
    elif re.search(r"\b(slows down|more slowly|loses speed|slowing down)\b", rest):
        claims.append(_Claim("speed", obj, "slow", at))
        rest = re.sub(r"\b(slows down|more slowly|loses speed|slowing down)\b", " ", rest)
    elif re.search(r"\b(slowly|slow pace)\b", rest) and not re.search(r"\bstill\b", rest):
        claims.append(_Claim("speed", obj, "slow", at, change=False))
    elif re.search(r"\b(quickly|fast|quick pace)\b", rest) and not re.search(r"\bstill\b", rest):
        claims.append(_Claim("speed", obj, "fast", at, change=False))
    motion = re.search(r"\b(?:moves|moving|heads|heading|drifting|travels|move|going)\s+(left|right|up|down)\b", rest)
    if motion:
        claims.append(_Claim("direction", obj, motion.group(1), at, change=changes_course))
    elif changes_course:
        turned = re.search(r"\bturning (left|right|up|down)\b", rest)
        if turned:
            claims.append(_Claim("direction", obj, turned.group(1), at))
    return claims


def _truth(world: World) -> dict[str, list[tuple]]:
    """Ground-truth narration facts per kind, each a (object, value) pair (a multiset)."""
    facts: dict[str, list[tuple]] = {k: [] for k in NARRATION_FACT_KINDS}
    for i, o in enumerate(world.objects):
        facts["objects"].append((i, None))
        facts["direction"].append((i, o.segments[0].direction))
        facts["speed"].append((i, o.segments[0].speed))
    for e in world.events:
        if e.kind in ("appear", "disappear"):
            facts[e.kind].append((e.obj, None))
        else:
            facts[e.kind].append((e.obj, e.value))
    facts["count"] = [("start", len(world.start_objects)), ("end", len(world.end_objects))]
    return facts


def score_narration(world: World, text: str) -> dict[str, tuple[int, int]]:
    """Facts of `world` stated correctly in `text`, per kind: {kind: (found, total)}. The total is
    the ground-truth facts of the kind plus every false claim of that kind (an event that did not
    happen, an object that does not exist), so an answer cannot score by claiming everything.
    "order" counts consecutive pairs of ground-truth events narrated in the right order. Never
    raises on any text."""
    truth = _truth(world)
    claims: list[_Claim] = []
    offset = 0
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        claims += _sentence_claims(world, sentence, offset)
        offset += len(sentence) + 1
    scores: dict[str, tuple[int, int]] = {}
    for kind in NARRATION_FACT_KINDS:
        if kind in ("count", "order"):
            continue
        want = Counter(truth[kind])
        if kind == "objects":
            # each true object mentioned once counts; each distinct name of no object is one false fact
            mentioned = {c.obj for c in claims if c.kind == kind and c.obj is not None}
            unknown = {c.value for c in claims if c.kind == kind and c.obj is None}
            scores[kind] = (len(mentioned), sum(want.values()) + len(unknown))
            continue
        got = Counter((c.obj, c.value) for c in claims if c.kind == kind)
        found = sum(min(want[k], got[k]) for k in want)
        if kind in ("direction", "speed"):     # states: restating a true one is not false
            false = sum(got[k] for k in got if k not in want)
        else:                                  # events: more than happened is false
            false = sum(max(0, got[k] - want[k]) for k in got)
        scores[kind] = (found, sum(want.values()) + false)
    # counts: the first number before "object"/"shape" in the text, and one in a sentence about the end
    found = 0
    lower = text.lower()
    start = re.search(r"\b(" + "|".join(NUMBER_WORDS[1:]) + r") (?:objects?|shapes?)\b", lower)
    if start and _number(start.group(1)) == truth["count"][0][1]:
        found += 1
    end_sentence = [s for s in re.split(r"(?<=[.!?])\s+", lower) if re.search(r"\bend", s)]
    end = _NUMBER_RE.search(end_sentence[-1]) if end_sentence else None
    if end and _number(end.group(1)) == truth["count"][1][1]:
        found += 1
    scores["count"] = (found, 2)
    # order: consecutive ground-truth events whose matching claims appear in that order
    unused: dict[tuple, list[int]] = {}
    for c in claims:
        if c.kind in ("appear", "disappear", "color", "shape", "direction", "speed") and c.change:
            key = (c.kind, c.obj, c.value if c.kind not in ("appear", "disappear") else None)
            unused.setdefault(key, []).append(c.position)
    positions = [unused[key].pop(0) if unused.get(key := (e.kind, e.obj, e.value)) else None
                 for e in world.events]
    pairs = list(zip(positions, positions[1:]))
    scores["order"] = (sum(a is not None and b is not None and a < b for a, b in pairs), len(pairs))
    return scores


def score_summary(world: World, text: str) -> dict[str, tuple[int, int]]:
    """Like `score_narration`, over the summary's facts: the starting count and up to five
    appear/disappear/color/shape events (the ones `summary` states)."""
    full = score_narration(world, text)
    kept = _summary_events(world)
    claims: list[_Claim] = []
    offset = 0
    for sentence in re.split(r"(?<=[.!?;,])\s+|\band\b", text):
        claims += _sentence_claims(world, sentence, offset)
        offset += len(sentence) + 1
    out = {"count": (int(full["count"][0] >= 1 and bool(re.search(
        r"\b(" + NUMBER_WORDS[len(world.start_objects)] + r") (?:objects?|shapes?)\b", text.lower()))), 1)}
    for kind in ("appear", "disappear", "color", "shape"):
        want = Counter((e.obj, e.value if kind in ("color", "shape") else None) for e in kept if e.kind == kind)
        got = Counter((c.obj, c.value if kind in ("color", "shape") else None) for c in claims if c.kind == kind)
        everything = Counter((e.obj, e.value if kind in ("color", "shape") else None)
                             for e in world.events if e.kind == kind)
        found = sum(min(want[k], got[k]) for k in want)
        false = sum(max(0, got[k] - everything[k]) for k in got)
        out[kind] = (found, sum(want.values()) + false)
    return out


def score_answer(world: World, qa: QA, text: str) -> tuple[int, int]:
    """(1, 1) when `text` answers `qa` correctly, else (0, 1). Never raises."""
    lower = text.lower()
    if qa.kind == "color_at":
        m = re.search(rf"\b({_COLOR})\b", lower)
        return int(bool(m) and m.group(1) == qa.truth), 1
    if qa.kind == "count":
        m = _NUMBER_RE.search(lower)
        return int(bool(m) and NUMBER_WORDS[_number(m.group(1))] == qa.truth
                   if m and _number(m.group(1)) < len(NUMBER_WORDS) else False), 1
    if qa.kind == "order":
        m = _NAME_RE.search(lower)
        return int(bool(m) and world.object_of_name(m.group(0)) == world.object_of_name(qa.truth)), 1
    if qa.kind == "direction":
        m = _DIRECTION_RE.search(lower)
        return int(bool(m) and m.group(1) == qa.truth), 1
    raise ValueError(f"qa.kind must be one of {QUESTION_KINDS}, got {qa.kind!r}")


def fact_fraction(scores: dict[str, tuple[int, int]]) -> float:
    """Found / total over every kind of a score dict."""
    found = sum(f for f, _ in scores.values())
    total = sum(t for _, t in scores.values())
    return found / max(total, 1)


def timestamps_close(world: World, text: str, tolerance: float = 1.0) -> tuple[int, int]:
    """(stated event times within `tolerance` seconds of the true time, stated times), for sentences
    that mention one event with a time; reported beside the facts, not part of them."""
    good = stated = 0
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        m = _TIME_RE.search(sentence.lower())
        if not m:
            continue
        claims = [c for c in _sentence_claims(world, sentence, 0) if c.kind not in ("objects",)]
        events = [e for e in world.events for c in claims if (e.kind, e.obj) == (c.kind, c.obj)]
        if not events:
            continue
        stated += 1
        good += any(abs(float(m.group(1)) - e.time) <= tolerance for e in events)
    return good, stated


def sample_text_corpus(seeds, rng: random.Random | None = None) -> list[str]:
    """Every kind of prompt and answer text for `seeds` (the tokenizer's training corpus)."""
    rng = rng or random.Random(0)
    texts = list(NARRATION_PROMPTS + SUMMARY_PROMPTS)
    for seed in seeds:
        world = World(seed)
        texts += [narration(world, rng), summary(world, rng)]
        for kind in QUESTION_KINDS:
            qa = make_question(world, kind, rng)
            if qa is not None:
                texts += [qa.question, qa.answer]
    return texts
