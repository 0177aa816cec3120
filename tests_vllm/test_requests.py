"""Requests as a server sees them: prompt-dependent methods pick the HF path's indices for each request's own prompt,
a batch of different requests gives each what it gets alone (the same image under two prompts included), and bad
options fail when the engine starts, never mid-request."""

from __future__ import annotations

import re

import pytest
from cases import PROMPTS, image
from engines import alone_and_together, start_error
from hf_reference import HFReference

from tokenprune.integrations.vllm import vllm_overrides
from tokenprune.integrations.vllm.options import parse_options
from tokenprune.tiny_models import random_image

QUESTIONS = ("what is in the image ?", "describe the colours in the top left corner of this picture please")


def _prompt(name: str, question: str) -> str:
    return PROMPTS[name].replace("what is in the image ?", question)


# (family, method, keep, options): prompt-dependent on both kinds of tower, and an attention signal over a batch of
# images of different sizes in one ViT call (Qwen2.5-VL windows)
BATCH_CASES = [("llava", "cdpruner", 12, {}), ("qwen2_5_vl", "mmtok", 8, {}),
               ("qwen2_5_vl", "hiprune", 8, {"object_layer": 0})]


@pytest.mark.parametrize(("name", "method", "keep", "options"), BATCH_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in BATCH_CASES])
def test_batch_equals_each_alone_and_prompt_dependent_indices_equal_hf(name, method, keep, options, model_dirs):
    overrides = vllm_overrides(name, method, keep=keep, **options)
    other = random_image(*((64, 64) if name == "llava" else (112, 84)), seed=11)  # Qwen: another grid (4 x 3)
    requests = [(_prompt(name, QUESTIONS[0]), image(name)), (_prompt(name, QUESTIONS[1]), image(name)),
                (_prompt(name, QUESTIONS[1]), other)]
    alone, batch = alone_and_together(model_dirs[name], requests, overrides)
    assert batch == [run for run, _ in alone]  # token ids and logprobs, exactly

    pruning = parse_options(overrides["tokenprune"], cls_token=name == "llava")
    hf = HFReference(model_dirs[name], name)
    for (prompt, im), (_, kept) in zip(requests[:2], alone[:2], strict=True):
        hf.inputs = hf.processor(text=prompt, images=im, return_tensors="pt")
        assert kept[0] == hf.selection(pruning).kept.tolist()
    if method != "hiprune":  # the text matters: the same image under the two questions keeps other tokens
        assert alone[0][1] != alone[1][1]


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("llava", {"method": "nope", "keep": 8}, "unknown method 'nope'"),
    ("llava", {"method": "fastv", "keep": 8}, "the nearest method the vLLM plugin runs on this model is 'fastervlm'"),
    ("qwen2_5_vl", {"method": "recoverable", "keep": 8}, "decides its kept count from the image content"),
    ("qwen2_5_vl", {"method": "fastervlm", "keep": 8}, "without a [CLS] token"),
])
def test_bad_methods_fail_at_engine_start(name, raw, message, model_dirs):
    from tokenprune.integrations.vllm import ARCHITECTURES

    overrides = {"architectures": [ARCHITECTURES[name][1]], "tokenprune": raw}
    assert re.search(re.escape(message), start_error(model_dirs[name], overrides))


def test_bad_hf_overrides_json_fails_when_the_cli_parses_it():
    """``vllm serve --hf-overrides '<bad JSON>'`` stops before any engine exists, saying what was wrong."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    good = parser.parse_args(["--hf-overrides", '{"tokenprune": {"method": "divprune", "keep": 0.25}}'])
    assert good.hf_overrides == {"tokenprune": {"method": "divprune", "keep": 0.25}}
    with pytest.raises(SystemExit):
        parser.parse_args(["--hf-overrides", "{'tokenprune': {method: divprune}"])
