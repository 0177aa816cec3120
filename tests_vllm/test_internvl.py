"""InternVL3 (HF format) in vLLM: vanilla equal to HF ``generate``, keep-all bit-identical to vanilla vLLM, each
method keeps ``enable_pruning``'s tokens and equals ``enable_pruning``'s generation (re-indexed 1-D positions in both:
logprobs within 1e-5), a batch of different requests gives each what it gets alone, refused methods fail at engine
start."""

from __future__ import annotations

import re

import pytest
from cases import Run
from compare import TOL, assert_batch_equals_alone, assert_matches, max_diff, report
from engines import alone_and_together, run_alone, start_error
from hf_reference import HFModel

from tokenprune.integrations.vllm import vllm_overrides
from tokenprune.integrations.vllm.checkpoints import save_tiny_checkpoint
from tokenprune.tiny_models import random_image

NAME = "internvl"
PROMPT = "USER : <IMG_CONTEXT> what is in the image ? ASSISTANT :"


def _image(seed: int = 3):
    return random_image(64, 128, seed=seed)  # 128 x 64 px: a 2 x 1 grid of 64-px tiles + the thumbnail


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory) -> str:
    return save_tiny_checkpoint(NAME, str(tmp_path_factory.mktemp("internvl") / NAME))


class InternVLHF(HFModel):
    """The HF side: the processor's inputs, ``generate``, and ``enable_pruning``'s generation and kept tokens."""

    def __init__(self, path: str, prompt: str = PROMPT, image=None):
        super().__init__(path, prompt, _image() if image is None else image)

    def pruned(self, method: str, keep, **options) -> tuple[Run, list[int]]:
        from tokenprune import disable_pruning, enable_pruning

        handle = enable_pruning(self.model, method=method, keep=keep, **options)
        try:
            run = self.generate()
            record = handle.last
            return Run(record.seq_len_after, run.tokens, run.logprobs), record.images[0].kept.tolist()
        finally:
            disable_pruning(self.model)


def _run_alone(path: str, overrides: dict | None = None) -> tuple[Run, list[list[int]]]:
    return run_alone(path, (PROMPT, _image()), overrides)


@pytest.fixture(scope="module")
def vanilla(internvl_dir) -> Run:
    return _run_alone(internvl_dir)[0]


def test_vanilla_matches_hf_and_keep_all_is_bit_identical(internvl_dir, vanilla):
    ref = InternVLHF(internvl_dir).generate()
    assert vanilla.prompt_len == ref.prompt_len and vanilla.tokens == ref.tokens
    report("vanilla vLLM vs HF generate, internvl", max_diff(vanilla, ref))
    assert max_diff(vanilla, ref) < TOL
    assert _run_alone(internvl_dir, vllm_overrides(NAME, "divprune", keep=1.0))[0] == vanilla


CASES = [
    ("divprune", 0.25, {}),                    # per image (its paper convention)
    ("fastervlm", 4, {}),                      # [CLS] attention, per tile
    ("visionzip", 6, {"keep_cls": False}),     # dominant patches + merged contextual tokens, projected
    ("cdpruner", 8, {}),                       # prompt-dependent
]


@pytest.mark.parametrize(("method", "keep", "options"), CASES, ids=[c[0] for c in CASES])
def test_pruned_matches_enable_pruning(method, keep, options, internvl_dir, vanilla):
    ours, kept = _run_alone(internvl_dir, vllm_overrides(NAME, method, keep=keep, **options))
    ref, ref_kept = InternVLHF(internvl_dir).pruned(method, keep, **options)
    assert kept == [ref_kept]
    assert ours.prompt_len == ref.prompt_len < vanilla.prompt_len
    assert_matches(ours, ref, vanilla, f"pruned vLLM vs enable_pruning, internvl {method} keep={keep}")


def test_batch_of_different_requests_equals_each_alone(internvl_dir):
    question = PROMPT.replace("what is in the image ?", "how many red circle are there ?")
    requests = [(PROMPT, _image()), (question, _image()), (PROMPT, random_image(64, 64, seed=11))]  # 1 tile
    alone, together = alone_and_together(internvl_dir, requests, vllm_overrides(NAME, "mmtok", keep=8))
    assert_batch_equals_alone(together, [run for run, _ in alone])
    for (prompt, image), (_, kept) in zip(requests, alone, strict=True):
        assert kept == [InternVLHF(internvl_dir, prompt, image).pruned("mmtok", 8)[1]]
    assert alone[0][1] != alone[1][1]  # the question changes the selection


def test_cls_token_method_is_refused_at_engine_start(internvl_dir):
    text = start_error(internvl_dir, vllm_overrides(NAME, "visionzip", keep=6))  # keep_cls=True: the [CLS] token
    assert re.search(r"keep_cls=False", text)
