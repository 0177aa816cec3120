"""Serving benchmark: `vllm serve` with and without pruning, side by side (docs/vllm.md, "Serving benchmark").

Run in the vLLM environment (make vllm-env), from the repository root; results go to benchmarks/results/:

    .venv-vllm/bin/python benchmarks/serve.py                      # mid-size LLaVA-1.5-shaped model, divprune
    .venv-vllm/bin/python benchmarks/serve.py --model-type qwen2_5_vl --method hiprune
    .venv-vllm/bin/python benchmarks/serve.py --dry-run            # check the arguments, print the commands
    .venv-vllm/bin/python benchmarks/serve.py --two-turn --methods divprune cdpruner --keeps 0.25 --concurrency 1

Same as `tokenprune serve-bench`; every option: --help.
"""

import sys

from tokenprune.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve-bench", *sys.argv[1:]]))
