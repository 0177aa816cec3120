"""The README's vLLM snippet runs as written on the vLLM CPU build and prints what its comment says."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_vllm_snippet_runs_as_written(capsys):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "vllm_overrides(" in b]
    assert len(blocks) == 1
    expected = re.search(r"print\(len\(out\[0\]\.prompt_token_ids\)\)\s+# (\d+):", blocks[0]).group(1)
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "__main__"})
    assert expected in capsys.readouterr().out.splitlines()  # vLLM logs to stdout too
