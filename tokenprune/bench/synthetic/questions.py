"""Questions with single-word answers about a :class:`~tokenprune.bench.synthetic.scenes.Scene`.

Eight question types, each answerable only from specific image regions:

- ``exist``: is there a red circle ? -> yes / no
- ``color``: what color is the square ? (the only square) -> red
- ``shape``: what shape is the blue object ? (the only blue one) -> circle
- ``count``: how many objects are there ? / how many circles are there ? -> zero ... four
- ``position``: is the red circle on the left or right ? / at the top or bottom ? -> left / right / top / bottom
- ``top``: what color / shape is the object at the top ? (one object alone in the top quarter of the image; in-LLM
  pruning by attention is known to lose the top rows, FEATHER, Endo et al., 2024)
- ``relative``: is the red circle left of / above the blue square ? -> yes / no
- ``small``: what color / shape is the small object ? (the only small one, about 1.5 patches wide)

Train and test data come from disjoint seed streams (``TRAIN_SEED`` and ``TEST_SEED``); everything is a pure function
of (seed, index).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from tokenprune.bench.synthetic.scenes import (
    COLORS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    SHAPES,
    TOP_BAND,
    TOP_GAP,
    Scene,
    sample_scene,
)

QUESTION_TYPES = ("exist", "color", "shape", "count", "position", "top", "relative", "small")
NUMBERS = ("zero", "one", "two", "three", "four")
PLURAL = {s: s + "s" for s in SHAPES}
TRAIN_SEED = 20241
TEST_SEED = 777001
PROMPT = "USER : <image>\n{question} ASSISTANT :"
MARGIN = 16  # positions closer than this to the decision line are not asked about


@dataclass(frozen=True)
class QA:
    qtype: str
    question: str
    answer: str


def _unique(scene: Scene):
    names = Counter(o.name for o in scene.objects)
    return [o for o in scene.objects if names[o.name] == 1]


def candidates(scene: Scene, rng: np.random.Generator) -> dict[str, list[QA]]:
    """Every question type this scene can answer unambiguously, with its candidate questions."""
    objs = scene.objects
    out: dict[str, list[QA]] = {t: [] for t in QUESTION_TYPES}
    present = {o.name for o in objs}
    # exist: balanced yes / no
    if rng.random() < 0.5:
        o = objs[int(rng.integers(len(objs)))]
        out["exist"].append(QA("exist", f"is there a {o.color} {o.shape} ?", "yes"))
    else:
        absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
        out["exist"].append(QA("exist", f"is there a {absent[int(rng.integers(len(absent)))]} ?", "no"))
    shapes, colors = Counter(o.shape for o in objs), Counter(o.color for o in objs)
    for o in objs:
        if shapes[o.shape] == 1:
            out["color"].append(QA("color", f"what color is the {o.shape} ?", o.color))
        if colors[o.color] == 1:
            out["shape"].append(QA("shape", f"what shape is the {o.color} object ?", o.shape))
    out["count"].append(QA("count", "how many objects are there ?", NUMBERS[len(objs)]))
    s = SHAPES[int(rng.integers(len(SHAPES)))]
    out["count"].append(QA("count", f"how many {PLURAL[s]} are there ?", NUMBERS[shapes[s]]))
    unique = _unique(scene)
    mid = IMAGE_SIZE / 2
    for o in unique:
        if abs(o.x - mid) >= MARGIN:
            out["position"].append(QA("position", f"is the {o.name} on the left or right ?",
                                      "left" if o.x < mid else "right"))
        if abs(o.y - mid) >= MARGIN:
            out["position"].append(QA("position", f"is the {o.name} at the top or bottom ?",
                                      "top" if o.y < mid else "bottom"))
    top = [o for o in objs if o.y < TOP_BAND]
    if len(top) == 1 and all(o.y >= TOP_GAP for o in objs if o is not top[0]):
        out["top"].append(QA("top", "what color is the object at the top ?", top[0].color))
        out["top"].append(QA("top", "what shape is the object at the top ?", top[0].shape))
    for a in unique:
        for b in unique:
            if a is b:
                continue
            if abs(a.x - b.x) >= 2 * MARGIN:
                out["relative"].append(QA("relative", f"is the {a.name} left of the {b.name} ?",
                                          "yes" if a.x < b.x else "no"))
            if abs(a.y - b.y) >= 2 * MARGIN:
                out["relative"].append(QA("relative", f"is the {a.name} above the {b.name} ?",
                                          "yes" if a.y < b.y else "no"))
    small = [o for o in objs if o.size == "small"]
    if len(small) == 1:
        out["small"].append(QA("small", "what color is the small object ?", small[0].color))
        out["small"].append(QA("small", "what shape is the small object ?", small[0].shape))
    return out


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def training_example(seed: int, index: int, max_turns: int = 6, max_objects: int = MAX_OBJECTS,
                     ) -> tuple[Scene, list[QA]]:
    """One scene and up to ``max_turns`` distinct questions about it (multi-turn, as in LLaVA's conversation data):
    one of every type the scene allows first, in random order, then more questions of random types; yes/no of
    ``relative`` balanced."""
    rng = scene_rng(seed, index)
    scene = sample_scene(rng, max_objects)
    cands = {t: c for t, c in candidates(scene, rng).items() if c}
    types = list(cands)
    rng.shuffle(types)
    order = types + [types[int(rng.integers(len(types)))] for _ in range(2 * max_turns)]
    turns: list[QA] = []
    for t in order:
        if len(turns) >= max_turns:
            break
        c = [q for q in cands[t] if q not in turns]
        if t == "relative":  # balance yes / no
            want = "yes" if rng.random() < 0.5 else "no"
            c = [q for q in c if q.answer == want] or c
        if c:
            turns.append(c[int(rng.integers(len(c)))])
    return scene, turns


def eval_split(n_per_type: int, seed: int = TEST_SEED) -> list[tuple[Scene, QA]]:
    """``n_per_type`` (scene, question) pairs of every type, one scene per question, deterministic from ``seed``."""
    items: list[tuple[Scene, QA]] = []
    index = 0
    for t in QUESTION_TYPES:
        got = 0
        while got < n_per_type:
            rng = scene_rng(seed, index)
            index += 1
            scene = sample_scene(rng)
            c = candidates(scene, rng)[t]
            if not c:
                continue
            if t == "relative":
                want = "yes" if got % 2 == 0 else "no"
                c = [q for q in c if q.answer == want]
                if not c:
                    continue
            items.append((scene, c[int(rng.integers(len(c)))]))
            got += 1
    return items


def vocabulary() -> list[str]:
    """Every word a prompt or an answer can contain (the trained model's word-level vocabulary)."""
    words = "USER ASSISTANT : ? is there a what color shape is the object how many objects are on left or right at "
    words += "top bottom of above small yes no"
    return sorted(set(words.split()) | set(COLORS) | set(SHAPES) | set(PLURAL.values()) | set(NUMBERS))
