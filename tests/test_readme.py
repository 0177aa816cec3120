"""The README's offline quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_offline_quickstart_runs_as_written(capsys):
    blocks = [b for b in python_blocks() if "tiny_llava()" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "divprune: kept 7/64 visual tokens over 1 image(s); prompt length 74 -> 17" in out
    assert out.rstrip().endswith("16")


def test_readme_gives_the_two_commands_first():
    text = README.read_text()
    first_bash = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert [line.split()[0:2] for line in first_bash.strip().splitlines()] == [["make", "demo"], ["make", "test"]]


def test_offline_family_snippet_runs_as_written(capsys):
    blocks = [b for b in python_blocks() if "tiny_qwen" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], str(README), "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fastervlm: kept 12/52 visual tokens over 1 image(s); prompt length 62 -> 22"
    assert out[1:] == ["divprune: kept 14/27 visual tokens over 2 image(s); prompt length 41 -> 28"] * 2
