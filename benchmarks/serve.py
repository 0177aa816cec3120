"""Serving benchmark: `vllm serve` with and without pruning, side by side (docs/vllm.md, "Serving benchmark").

Run in the vLLM environment (make vllm-env), from the repository root; results go to benchmarks/results/:

    .venv-vllm/bin/python benchmarks/serve.py                      # mid-size LLaVA-1.5-shaped model, divprune
    .venv-vllm/bin/python benchmarks/serve.py --model-type qwen2_5_vl --method hiprune
    .venv-vllm/bin/python benchmarks/serve.py --dry-run            # check the arguments, print the commands

Same as `tokenprune serve-bench`; every option: --help.
"""

import sys

from tokenprune.integrations.vllm.serve_bench import main

if __name__ == "__main__":
    sys.exit(main())
