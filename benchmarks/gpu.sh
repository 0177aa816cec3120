#!/usr/bin/env bash
# The serving benchmark (docs/vllm.md) on a GPU with real checkpoints: LLaVA-1.5-7B (FasterVLM, CLIP [CLS]
# attention) and Qwen2.5-VL-7B (HiPrune, attention received in the ViT), each unpruned and at keep 0.5/0.25/0.11,
# with FlashAttention for the vision encoder. Needs a CUDA vLLM (pip install vllm) with tokenprune installed next to
# it and the two checkpoints in the Hugging Face cache (or network access to the hub).
#
#   benchmarks/gpu.sh              run (results in benchmarks/results/gpu/)
#   benchmarks/gpu.sh --dry-run    check the arguments and print the vllm serve commands, run nothing
#
# Any other argument is passed to every `tokenprune serve-bench` call (e.g. --requests 500 --concurrency 32).
set -euo pipefail
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results/gpu}
COMMON=(--device cuda --requests 200 --concurrency 16 --max-tokens 128 --image-size 672 672 --out "$OUT"
        --serve-arg=--mm-encoder-attn-backend --serve-arg=FLASH_ATTN)
run() {  # model model_type method
  "$PYTHON" -m tokenprune serve-bench --model "$1" --model-type "$2" --method "$3" "${COMMON[@]}" "${@:4}"
}
run llava-hf/llava-1.5-7b-hf llava fastervlm "$@"
run Qwen/Qwen2.5-VL-7B-Instruct qwen2_5_vl hiprune "$@"
