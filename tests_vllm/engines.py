"""Engines of the per-family vLLM tests (Gemma 3, InternVL3, Qwen3.5): one tiny checkpoint, greedy generation of a
batch of (prompt, image) requests, and the kept tokens the model recorded in its last encoder call."""

from __future__ import annotations

import gc

from cases import MAX_TOKENS, Run


def engine(path: str, overrides: dict | None = None, dtype: str = "float32", videos: bool = True):
    """An in-process engine for one image per prompt (``videos=False``: a family without a video limit)."""
    from vllm import LLM

    limit = {"image": 1, "video": 0} if videos else {"image": 1}
    return LLM(model=path, dtype=dtype, max_model_len=1024, max_num_seqs=4, enforce_eager=True, seed=0,
               limit_mm_per_prompt=limit, distributed_executor_backend="uni",
               **({"hf_overrides": overrides} if overrides else {}))


def generate(llm, batch) -> tuple[list[Run], list[list[int]]]:
    """Greedy runs of ``batch`` ((prompt, image) pairs) and the kept tokens of each image of the last encoder call."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in batch], params, use_tqdm=False)
    runs = [Run(len(o.prompt_token_ids), list(o.outputs[0].token_ids),
                [s[t].logprob for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)])
            for o in outs]
    kept = llm.apply_model(lambda model: [k.tolist() for k in getattr(model, "tokenprune_kept", [])])[0]
    return runs, kept


def run_alone(path: str, request, overrides: dict | None = None, **engine_options) -> tuple[Run, list[list[int]]]:
    """One request on a fresh engine, freed afterwards."""
    llm = engine(path, overrides, **engine_options)
    try:
        runs, kept = generate(llm, [request])
        return runs[0], kept
    finally:
        del llm
        gc.collect()


def error_text(info) -> str:
    """A raised error with its chain of causes (vLLM may wrap the plugin's ValueError)."""
    text, cause = str(info.value), info.value.__cause__
    while cause is not None:
        text, cause = text + " | " + str(cause), cause.__cause__
    return text
