"""docs/conversations.md: its example runs as written, and what it shows holds (reusing the pruned cache answers as a
fresh pruned run of the whole conversation does, for an image-only selector)."""

import re
from pathlib import Path

import torch

from tokenprune import disable_pruning

PAGE = Path(__file__).resolve().parents[1] / "docs" / "conversations.md"


def test_conversation_example_runs_and_equals_a_fresh_pruned_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 2  # this example, then the new-image one (marked runnable: tests/test_docs.py runs it)
    ns: dict = {}
    exec(compile(blocks[0], str(PAGE), "exec"), ns)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].startswith("what is it ?") and lines[2].startswith("is it red ?")
    model, inputs, turn2, answer = ns["model"], ns["inputs"], ns["turn2"], ns["answer"]
    fresh = dict(inputs, input_ids=turn2, attention_mask=torch.ones_like(turn2))
    with torch.no_grad():
        expected = model.generate(**fresh, max_new_tokens=4, do_sample=False)
        prefix, ids = ns["prefix"], ns["ids"]
        last = model.generate(**dict(prefix, input_ids=ids, attention_mask=torch.ones_like(ids)), max_new_tokens=3,
                              do_sample=False)
    disable_pruning(model)
    assert torch.equal(answer, expected)
    assert lines[0] == str(answer[0, turn2.shape[1]:].tolist())
    assert torch.equal(ns["reply"], last)
