import io
import json
import subprocess
import sys

import pytest

from tokenprune import demo
from tokenprune.cli import main
from tokenprune.methods import METHODS


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["methods", "--help"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert "usage: tokenprune" in capsys.readouterr().out


def test_methods_json(capsys):
    assert main(["methods", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == set(METHODS)
    assert info["fastervlm"]["needs"] == ["cls_attention"]


@pytest.mark.parametrize("argv, message", [
    (["demo", "--keep", "1.5"], "(0, 1]"), (["demo", "--keep", "many"], "ratio like 0.11"),
    (["demo", "--method", "nope"], "known methods"),
])
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "tokenprune", "methods"], capture_output=True, text=True, check=True)
    assert "divprune" in out.stdout and "CVPR 2025" in out.stdout


def test_demo_answers_and_prints_the_table():
    """The demo end to end on the shipped trained model: the question, the answers, the timing table, the grid."""
    buffer = io.StringIO()
    rows = demo.run(method="divprune", keep=0.11, repeats=1, out=buffer)
    text = buffer.getvalue()
    assert [r.visual_tokens for r in rows] == [256, 28]
    assert rows[0].sequence_length - rows[1].sequence_length == 228
    assert "speed-up" in text and "new tokens: yes" in text
    answers = [line for line in text.splitlines() if line.startswith("answer ")]
    assert len(answers) == 2 and text.startswith("loading the trained")
    assert "what color is the object at the top ?" in text and "reference answer: red" in text
    assert "answer unpruned: red   (correct)" in text  # the trained model answers the demo question
    assert text.count("#") >= 28
