"""Pruning options from lmms-eval ``--model_args`` and the paper sweep's commands (no lmms-eval needed)."""

import importlib.util
from pathlib import Path

import pytest

from tokenprune.integrations.model_args import parse_value, pruning_from_model_args, split_args_string

WRAPPER = frozenset({"pretrained", "device", "dtype"})


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("pretrained=x,method=divprune,keep=0.11", {"method": "divprune", "keep": 0.11}),
        ("pretrained=x,method=fastervlm,keep=64", {"method": "fastervlm", "keep": 64}),
        ("pretrained=x,method=divprune,keep=1.0", {"method": "divprune", "keep": 1.0}),
        ("pretrained=x,method=random,keep=0.5,seed=3,scope=image",
         {"method": "random", "keep": 0.5, "seed": 3, "scope": "image"}),
        ("pretrained=x,method=divprune,flops=0.25", {"method": "divprune", "flops": 0.25}),
        ("pretrained=x,method=divprune+fastv,keep=0.5+0.25", {"method": ["divprune", "fastv"], "keep": [0.5, 0.25]}),
        ("pretrained=x,method=[divprune,fastv],keep=[64,32],device=cpu",
         {"method": ["divprune", "fastv"], "keep": [64, 32]}),
        ('pretrained=x,method=["divprune","fastv"],flag=true', {"method": ["divprune", "fastv"], "flag": True}),
        ("pretrained=x,device=cpu", {}),
    ],
)
def test_pruning_options_from_model_args(args, expected):
    result = pruning_from_model_args(args, WRAPPER)
    assert result == expected
    assert all(type(result[k]) is type(v) for k, v in expected.items())  # 64 stays int, 1.0 stays float


def test_values_already_converted_by_lmms_eval_pass_through():
    assert parse_value(64) == 64 and parse_value(0.25) == 0.25 and parse_value(True) is True
    assert parse_value("none") is None


def test_options_without_a_method_are_refused():
    with pytest.raises(ValueError, match="method="):
        pruning_from_model_args("pretrained=x,keep=0.5", WRAPPER)


def test_split_keeps_brackets_and_quotes_together():
    assert split_args_string('a=1,b=[x,y],c="p,q",d={"k":1,"l":2}') == {
        "a": "1", "b": "[x,y]", "c": '"p,q"', "d": '{"k":1,"l":2}'}
    with pytest.raises(ValueError, match="key=value"):
        split_args_string("a=1,oops")


def load_script(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lmms_eval" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_commands_cover_methods_times_budgets(capsys):
    sweep = load_script("sweep")
    assert sweep.main(["--pretrained", "llava-hf/llava-1.5-7b-hf", "--methods", "divprune", "fastervlm",
                       "--num-processes", "8", "--output-path", "runs/x", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 2 * 3
    assert "unpruned" in lines[0] and "method=" not in lines[0]
    assert all("accelerate launch --num_processes=8" in line for line in lines)
    assert any("method=fastervlm,keep=64" in line and "runs/x/fastervlm_keep64" in line for line in lines)
    assert all("--tasks gqa,mmbench_en_dev,mme,pope,scienceqa_img,textvqa_val,vqav2_val" in line for line in lines)
