"""The vLLM page's snippet (docs/vllm.md, the block marked ``<!-- runnable: vllm -->``) runs as written on the vLLM
CPU build and prints what its comment says."""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "vllm.md"


def test_vllm_snippet_runs_as_written(capsys):
    blocks = re.findall(r"<!-- runnable: vllm -->\n```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 1 and "vllm_overrides(" in blocks[0]
    expected = re.search(r"print\(len\(out\[0\]\.prompt_token_ids\)\)\s+# (\d+):", blocks[0]).group(1)
    exec(compile(blocks[0], str(PAGE), "exec"), {"__name__": "__main__"})
    assert expected in capsys.readouterr().out.splitlines()  # vLLM logs to stdout too
