"""Which image tokens a question is about: the grounding targets of the recipe's attention supervision.

Every question type names the objects its answer depends on (:func:`referents`); :func:`attention_targets` turns
them into the attention distribution that a few heads of the LM are trained to put on the prompt (see
:mod:`.vqa_stage`): uniform over the patches the referred objects cover, or, for a count, uniform over the first
token (a "sink") and one anchor patch per counted object (the patch holding the object's centre), so that the share
left on the sink, ``1 / (1 + n)``, tells the count. A question whose referent is absent ("is there a red circle ?"
-> no, "how many circles ?" -> zero) puts everything on the sink.
"""

from __future__ import annotations

import numpy as np

from tokenprune.bench.synthetic.questions import PLURAL, QA
from tokenprune.bench.synthetic.scenes import GRID, PATCH, TOP_BAND, Scene, patch_labels

SINGULAR = {p: s for s, p in PLURAL.items()}


def _named(scene: Scene, words: list[str]) -> list[int]:
    """Objects matching a "colour shape" name or a lone colour / shape word."""
    out = []
    for i, o in enumerate(scene.objects):
        if all(w in (o.color, o.shape) for w in words):
            out.append(i)
    return out


def referents(scene: Scene, qa: QA) -> tuple[list[int], list[int], bool]:
    """``(primary, secondary, count)``: indices of the objects the answer depends on. ``secondary`` is the second
    object of a ``relative`` question (otherwise equal to ``primary``); ``count`` is true for counting questions."""
    words = qa.question.rstrip(" ?").split()
    objs = scene.objects
    if qa.qtype == "exist":  # is there a C S
        hit = _named(scene, words[3:5])
        return hit, hit, False
    if qa.qtype == "color":  # what color is the S
        hit = _named(scene, [words[4]])
        return hit, hit, False
    if qa.qtype == "shape":  # what shape is the C object
        hit = _named(scene, [words[4]])
        return hit, hit, False
    if qa.qtype == "count":  # how many objects / S-plural are there
        hit = list(range(len(objs))) if words[2] == "objects" else _named(scene, [SINGULAR[words[2]]])
        return hit, hit, True
    if qa.qtype == "position":  # is the C S on the left or right / at the top or bottom
        hit = _named(scene, words[2:4])
        return hit, hit, False
    if qa.qtype == "top":
        hit = [i for i, o in enumerate(objs) if o.y < TOP_BAND]
        return hit, hit, False
    if qa.qtype == "relative":  # is the C S left of / above the C S
        return _named(scene, words[2:4]), _named(scene, words[-2:]), False
    if qa.qtype == "small":
        hit = [i for i, o in enumerate(objs) if o.size == "small"]
        return hit, hit, False
    raise ValueError(f"unknown question type {qa.qtype!r}")


def anchor_patch(o) -> int:
    """The patch holding an object's centre (row-major index)."""
    return int(min(o.y // PATCH, GRID - 1)) * GRID + int(min(o.x // PATCH, GRID - 1))


def attention_targets(scene: Scene, qa: QA, owner: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(primary, secondary)``: two distributions over ``[sink, patch 0 .. patch 255]`` (``1 + GRID*GRID``)."""
    owner = patch_labels(scene) if owner is None else owner
    primary, secondary, count = referents(scene, qa)

    def dist(objects: list[int]) -> np.ndarray:
        p = np.zeros(1 + GRID * GRID, np.float32)
        if count:
            p[0] = 1.0
            for i in objects:
                p[1 + anchor_patch(scene.objects[i])] = 1.0
        else:
            for i in objects:
                cover = np.flatnonzero(owner == i + 1)
                p[1 + (cover if len(cover) else anchor_patch(scene.objects[i]))] = 1.0
            if not objects:
                p[0] = 1.0
        return p / p.sum()

    return dist(primary), dist(secondary)
