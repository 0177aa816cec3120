"""Gemma 3 in vLLM: vanilla equal to HF ``generate``, keep-all bit-identical to vanilla vLLM, each method keeps
``enable_pruning``'s tokens and equals an HF forward of the prompt ``enable_pruning`` builds (logprobs within 1e-5),
a batch of different requests gives each what it gets alone, refused methods fail at engine start.

vLLM 0.32's CPU attention backend has no bidirectional image block (``supports_mm_prefix`` is False): image tokens
attend causally there, pruned or not. The HF side therefore runs without ``token_type_ids`` (causal) where it is
compared with vLLM, and the tests check that the bidirectional HF model gives other logprobs (so the causal
comparison is a real statement about the CPU build, not a blind spot of the test).
"""

from __future__ import annotations

import re

import pytest
import torch
from cases import MAX_TOKENS, Run
from compare import TOL, assert_batch_equals_alone, assert_matches, max_diff, report
from engines import alone_and_together, run_alone, start_error
from hf_reference import HFModel

from tokenprune.integrations.vllm import vllm_overrides
from tokenprune.integrations.vllm.checkpoints import save_tiny_checkpoint
from tokenprune.tiny_models import random_image

NAME = "gemma3"
N_TOKENS = 36  # tiny Gemma 3: 96 px / patch 4 = 24 x 24 patches, pooled 4 x 4 -> 6 x 6 tokens per image
PROMPT = "USER : <start_of_image> what is in the image ? ASSISTANT :"  # no "\n": the tiny tokenizer drops it


def _image(seed: int = 3):
    return random_image(80, 120, seed=seed)  # resized to 96 x 96 by the processor


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    return save_tiny_checkpoint(NAME, str(tmp_path_factory.mktemp("gemma3") / NAME))


class GemmaHF(HFModel):
    """The HF side: the processor's inputs, ``generate`` with or without the bidirectional image block, and greedy
    decoding of the prompt ``enable_pruning`` builds."""

    def __init__(self, path: str, prompt: str = PROMPT, image=None):
        super().__init__(path, prompt, _image() if image is None else image)

    def generate(self, bidirectional: bool) -> Run:
        inputs = dict(self.inputs)
        if not bidirectional:
            inputs.pop("token_type_ids")
        return super().generate(inputs)

    @torch.no_grad()
    def pruned(self, method: str, keep, **options) -> tuple[Run, list[int]]:
        """``enable_pruning``'s kept tokens, and a causal greedy decode of the prompt it builds (its compacted ids
        and kept features, re-indexed positions), captured at the model's prefill."""
        from tokenprune import disable_pruning, enable_pruning

        seen: list[dict] = []
        hook = self.model.model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs) if kwargs.get("mm_encoder_outputs") else None,
            with_kwargs=True,
        )
        handle = enable_pruning(self.model, method=method, keep=keep, **options)
        try:
            self.model.generate(**self.inputs, max_new_tokens=1, do_sample=False)
            kept = handle.last.images[0].kept.tolist()
        finally:
            disable_pruning(self.model)
            hook.remove()
        ids = seen[0]["input_ids"][0]
        features = seen[0]["mm_encoder_outputs"]["image"].pooler_output.flatten(0, -2)
        embed = self.model.get_input_embeddings()
        embeds = embed(ids)[None].clone()
        embeds[0, ids == self.model.config.image_token_id] = features
        lm = self.model.model.language_model
        tokens, logprobs = [], []
        for _ in range(MAX_TOKENS):
            hidden = lm(inputs_embeds=embeds).last_hidden_state[:, -1]
            logp = torch.log_softmax(self.model.lm_head(hidden).float(), -1)[0]
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
        return Run(ids.numel(), tokens, logprobs), kept


def _run_alone(path: str, overrides: dict | None = None) -> tuple[Run, list[list[int]]]:
    return run_alone(path, (PROMPT, _image()), overrides, videos=False)


@pytest.fixture(scope="module")
def vanilla(gemma_dir) -> Run:
    return _run_alone(gemma_dir)[0]


def test_vanilla_matches_causal_hf_and_keep_all_is_bit_identical(gemma_dir, vanilla):
    hf = GemmaHF(gemma_dir)
    causal, bidirectional = hf.generate(bidirectional=False), hf.generate(bidirectional=True)
    assert vanilla.prompt_len == causal.prompt_len and vanilla.tokens == causal.tokens
    report("vanilla vLLM vs HF generate (causal image block), gemma3", max_diff(vanilla, causal))
    assert max_diff(vanilla, causal) < TOL
    assert max_diff(vanilla, bidirectional) > 100 * TOL  # the CPU build's attention is causal over the image
    assert _run_alone(gemma_dir, vllm_overrides(NAME, "divprune", keep=1.0))[0] == vanilla


CASES = [
    ("divprune", 9, {}),
    ("hiprune", 9, {"object_layer": 0}),  # attention received in SigLIP, pooled 4 x 4
    ("visiondrop", 9, {}),                # merged tokens through the projector's tail
    ("mmtok", 0.25, {}),                  # prompt-dependent, SigLIP hidden states
]


@pytest.mark.parametrize(("method", "keep", "options"), CASES, ids=[c[0] for c in CASES])
def test_pruned_matches_enable_pruning(method, keep, options, gemma_dir, vanilla):
    ours, kept = _run_alone(gemma_dir, vllm_overrides(NAME, method, keep=keep, **options))
    ref, ref_kept = GemmaHF(gemma_dir).pruned(method, keep, **options)
    assert kept == [ref_kept]
    assert ours.prompt_len == ref.prompt_len < vanilla.prompt_len
    assert_matches(ours, ref, vanilla, f"pruned vLLM vs enable_pruning's prompt (causal), gemma3 {method} keep={keep}")


def test_batch_equals_alone_and_prompt_dependent_indices(gemma_dir):
    question = PROMPT.replace("what is in the image ?", "how many red circle are there ?")
    requests = [(PROMPT, _image()), (question, _image()), (PROMPT, _image(seed=11))]
    alone, together = alone_and_together(gemma_dir, requests, vllm_overrides(NAME, "cdpruner", keep=9), videos=False)
    assert_batch_equals_alone(together, [run for run, _ in alone])
    for (prompt, image), (_, kept) in zip(requests, alone, strict=True):
        _, ref_kept = GemmaHF(gemma_dir, prompt, image).pruned("cdpruner", 9)
        assert kept == [ref_kept]
    assert alone[0][1] != alone[1][1]  # the question changes the selection


def test_refused_method_fails_at_engine_start(gemma_dir):
    text = start_error(gemma_dir, vllm_overrides(NAME, "fastervlm", keep=9), videos=False)
    assert re.search(r"\[CLS\]", text) and re.search(r"nearest method .* is 'holov'", text)


def test_bidirectional_range_is_exactly_the_kept_soft_tokens():
    """What vLLM's runner hands an attention backend with the bidirectional image block (GPU backends; not the CPU
    build's): the placeholder's embed range, which after pruning covers exactly the kept soft tokens."""
    from vllm.multimodal.inputs import PlaceholderRange
    from vllm.multimodal.processing.processor import PromptUpdateDetails

    from tokenprune.integrations.vllm.gemma3 import cut_runs

    newline, boi, soft, eoi = 8, 5, 7, 6
    full = [newline, boi] + [soft] * N_TOKENS + [eoi, newline]
    details = PromptUpdateDetails.select_token_id(cut_runs(full, soft, lambda n: n // 4), soft)
    assert details.full == [newline, boi] + [soft] * (N_TOKENS // 4) + [eoi, newline]
    placeholder = PlaceholderRange(offset=10, length=len(details.full), is_embed=details.is_embed(details.full))
    assert placeholder.extract_embeds_range() == [(12, 12 + N_TOKENS // 4 - 1)]
