"""InternVL3 (HF format) in vLLM: vanilla equal to HF ``generate``, keep-all bit-identical to vanilla vLLM, each
method keeps ``enable_pruning``'s tokens and equals ``enable_pruning``'s generation (re-indexed 1-D positions in both:
logprobs within 1e-5), a batch of different requests gives each what it gets alone, refused methods fail at engine
start."""

from __future__ import annotations

import gc
import re

import pytest
import torch
from cases import MAX_TOKENS, Run
from engines import engine, error_text, generate, run_alone
from test_e2e import TOL, max_diff, report

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


class InternVLHF:
    def __init__(self, path: str, prompt: str = PROMPT, image=None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.model.generation_config.suppress_tokens = None  # vLLM does not apply it
        self.inputs = self.processor(text=prompt, images=_image() if image is None else image, return_tensors="pt")

    @torch.no_grad()
    def generate(self) -> Run:
        out = self.model.generate(**self.inputs, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                                  output_logits=True, return_dict_in_generate=True)
        n = self.inputs["input_ids"].shape[1]
        tokens = out.sequences[0, n:].tolist()
        return Run(n, tokens, [float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(out.logits, tokens,
                                                                                                 strict=True)])

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
    assert ours.tokens == ref.tokens
    report(f"pruned vLLM vs enable_pruning, internvl {method} keep={keep}", max_diff(ours, ref))
    assert max_diff(ours, ref) < TOL
    assert max_diff(vanilla, ref) > 100 * TOL  # the comparison can fail: the unpruned prompt gives other logprobs


def test_batch_of_different_requests_equals_each_alone(internvl_dir):
    question = PROMPT.replace("what is in the image ?", "how many red circle are there ?")
    requests = [(PROMPT, _image()), (question, _image()), (PROMPT, random_image(64, 64, seed=11))]  # 1 tile
    llm = engine(internvl_dir, vllm_overrides(NAME, "mmtok", keep=8))
    try:
        alone = [generate(llm, [r]) for r in requests]
        together, _ = generate(llm, requests)
    finally:
        del llm
        gc.collect()
    for a, (b, _) in zip(together, alone, strict=True):
        assert a.tokens == b[0].tokens
        assert max_diff(a, b[0]) < TOL
    for (prompt, image), (_, kept) in zip(requests, alone, strict=True):
        assert kept == [InternVLHF(internvl_dir, prompt, image).pruned("mmtok", 8)[1]]
    assert alone[0][1] != alone[1][1]  # the question changes the selection


def test_cls_token_method_is_refused_at_engine_start(internvl_dir):
    with pytest.raises(Exception) as info:  # noqa: PT011 - vLLM may wrap the plugin's ValueError
        engine(internvl_dir, vllm_overrides(NAME, "visionzip", keep=6))  # keep_cls=True: the [CLS] token itself
    gc.collect()
    assert re.search(r"keep_cls=False", error_text(info))
