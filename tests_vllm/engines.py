"""Engines of the vLLM tests: one tiny checkpoint in this process, greedy generation of a batch of (prompt, media)
requests, the kept tokens the model recorded in its last encoder call, and the error an engine start raised."""

from __future__ import annotations

import gc

import pytest
from cases import MAX_TOKENS, Run


def engine(path: str, overrides: dict | None = None, dtype: str = "float32", videos: bool = True, **options):
    """An in-process engine for one image per prompt (``videos=False``: a family without a video limit);
    ``options``: other ``LLM`` arguments, or these defaults replaced (``max_num_seqs``, ``limit_mm_per_prompt``)."""
    from vllm import LLM

    settings = {"max_num_seqs": 4, "limit_mm_per_prompt": {"image": 1, "video": 0} if videos else {"image": 1},
                **options}
    return LLM(model=path, dtype=dtype, max_model_len=1024, enforce_eager=True, seed=0,
               distributed_executor_backend="uni", **settings, **({"hf_overrides": overrides} if overrides else {}))


def generate(llm, batch, modality: str = "image") -> tuple[list[Run], list[list[int]]]:
    """Greedy runs of ``batch`` ((prompt, item) pairs, ``item`` of ``modality``) in ONE ``generate`` call, and the
    kept tokens of each image of the last encoder call."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt": p, "multi_modal_data": {modality: item}} for p, item in batch], params,
                        use_tqdm=False)
    runs = [Run(len(o.prompt_token_ids), list(o.outputs[0].token_ids),
                [s[t].logprob for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)])
            for o in outs]
    kept = llm.apply_model(lambda model: [k.tolist() for k in getattr(model, "tokenprune_kept", [])])[0]
    return runs, kept


def run_alone(path: str, request, overrides: dict | None = None, modality: str = "image",
              **engine_options) -> tuple[Run, list[list[int]]]:
    """One request on a fresh engine, freed afterwards."""
    llm = engine(path, overrides, **engine_options)
    try:
        runs, kept = generate(llm, [request], modality)
        return runs[0], kept
    finally:
        del llm
        gc.collect()


def alone_and_together(path: str, requests, overrides: dict | None = None,
                       **engine_options) -> tuple[list[tuple[Run, list[list[int]]]], list[Run]]:
    """On ONE engine (freed afterwards): each request alone, ``(run, kept tokens)``, then all of them in one
    ``generate`` call (a batch: different images in one encoder call)."""
    llm = engine(path, overrides, **engine_options)
    try:
        alone = [generate(llm, [r]) for r in requests]
        together, _ = generate(llm, requests)
    finally:
        del llm
        gc.collect()
    return [(runs[0], kept) for runs, kept in alone], together


def start_error(path: str, overrides: dict, **engine_options) -> str:
    """The error an engine start raises, with its chain of causes (vLLM may wrap the plugin's ValueError)."""
    with pytest.raises(Exception) as info:  # noqa: PT011 - vLLM may wrap the plugin's ValueError
        engine(path, overrides, **engine_options)
    gc.collect()
    return error_text(info)


def error_text(info) -> str:
    """A raised error with its chain of causes (vLLM may wrap the plugin's ValueError)."""
    text, cause = str(info.value), info.value.__cause__
    while cause is not None:
        text, cause = text + " | " + str(cause), cause.__cause__
    return text
