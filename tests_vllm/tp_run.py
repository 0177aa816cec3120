"""One greedy generation with ``tensor_parallel_size=2`` on the vLLM CPU build, run as its own process by
test_tensor_parallel.py (the two ranks are worker processes; gloo + vLLM's CPU communicator between them).

usage: python tp_run.py MODEL_DIR NAME OVERRIDES_JSON   -> prints one line ``RUN {json}``
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import MAX_TOKENS, PROMPTS, image  # noqa: E402


def main() -> None:
    from vllm import LLM, SamplingParams

    path, name, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(model=path, dtype="float32", max_model_len=1024, max_num_seqs=2, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0}, tensor_parallel_size=2,
              distributed_executor_backend="mp", **({"hf_overrides": overrides} if overrides else {}))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    out = llm.generate([{"prompt": PROMPTS[name], "multi_modal_data": {"image": image(name)}}], params)[0]
    completion = out.outputs[0]
    logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids, strict=True)]
    print("RUN " + json.dumps({"prompt_len": len(out.prompt_token_ids), "tokens": list(completion.token_ids),
                               "logprobs": logprobs}), flush=True)


if __name__ == "__main__":
    main()
