import json

import pytest

from tokenprune import PruningConfig
from tokenprune.budget import kept_count, validate_keep
from tokenprune.methods import METHODS


@pytest.mark.parametrize(
    "keep, n, k",
    [
        (0.5, 576, 288), (0.25, 576, 144), (0.1, 576, 58), (0.05, 576, 29),  # FasterVLM's published counts
        (0.098, 576, 56),  # DivPrune's default ratio
        (0.11, 576, 63), (1.0, 576, 576), (0.001, 576, 1),  # at least one token
        (0.5, 5, 3),  # 2.5 rounds half up
        (64, 576, 64), (1000, 576, 576), (1, 576, 1),
    ],
)
def test_kept_count(keep, n, k):
    assert kept_count(keep, n) == k


@pytest.mark.parametrize("bad, exc, match", [
    (0.0, ValueError, r"\(0, 1\]"), (-0.1, ValueError, r"\(0, 1\]"), (1.5, ValueError, r"\(0, 1\]"),
    (64.0, ValueError, "keep=64"), (float("nan"), ValueError, r"\(0, 1\]"), (0, ValueError, ">= 1"),
    (-3, ValueError, ">= 1"), ("64", TypeError, "int token count"), (True, TypeError, "int token count"),
    (None, TypeError, "int token count"),
])
def test_bad_keep_is_explained(bad, exc, match):
    with pytest.raises(exc, match=match):
        validate_keep(bad)


def test_config_round_trips_through_dict_and_json():
    cfg = PruningConfig("random", 0.25, {"seed": 7})
    assert PruningConfig.from_dict(cfg.to_dict()) == cfg
    assert PruningConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json()) == {"method": "random", "keep": 0.25, "options": {"seed": 7}}
    count = PruningConfig("divprune", 64)
    assert PruningConfig.from_json(count.to_json()).keep == 64 and isinstance(count.keep, int)


def test_config_validates():
    with pytest.raises(ValueError, match="known methods: " + ", ".join(sorted(METHODS))):
        PruningConfig("fastv2000", 0.5)
    with pytest.raises(TypeError, match="options are: seed"):
        PruningConfig("random", 0.5, {"sed": 1})
    with pytest.raises(ValueError, match="unknown PruningConfig key"):
        PruningConfig.from_dict({"method": "random", "keep": 0.5, "ratio": 2})
