"""Quantization options: lmms-eval ``--model_args`` and the bench flags build transformers' ``BitsAndBytesConfig``
(no lmms-eval needed); the loading switch the lmms-eval wrappers use; the overlap measure of the selection."""

import json
from types import SimpleNamespace

import bitsandbytes  # noqa: F401 -- in the dev extra: a missing install fails loudly, it does not skip
import pytest
import torch
from transformers import LlavaForConditionalGeneration, PreTrainedModel

from tokenprune.bench.quantized_overlap import image_overlaps
from tokenprune.cli import main
from tokenprune.integrations.model_args import (
    pruning_from_model_args,
    quantization_from_model_args,
    quantized_loading,
)
from tokenprune.quantization import bnb_config, describe
from tokenprune.tiny_models import tiny_llava

WRAPPER = frozenset({"pretrained", "device", "dtype", "device_map"})


def test_model_args_split_into_pruning_and_a_4bit_config():
    args = ("pretrained=x,method=divprune,keep=0.11,load_in_4bit=True,bnb_4bit_quant_type=nf4,"
            "bnb_4bit_use_double_quant=True,bnb_4bit_compute_dtype=bfloat16,device=cpu")
    assert pruning_from_model_args(args, WRAPPER) == {"method": "divprune", "keep": 0.11}
    config = quantization_from_model_args(args, WRAPPER)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert describe(config) == "bnb-4bit-nf4-dq"


def test_model_args_8bit_and_no_quantization():
    config = quantization_from_model_args("pretrained=x,load_in_8bit=true,llm_int8_skip_modules=[lm_head,a]", WRAPPER)
    assert config.load_in_8bit and config.llm_int8_skip_modules == ["lm_head", "a"]
    assert describe(config) == "bnb-8bit"
    assert quantization_from_model_args("pretrained=x,method=divprune,keep=0.5", WRAPPER) is None
    assert describe(None) == "none"
    # quantization alone is not a pruning option: no "method=... missing" error, no pruning
    assert pruning_from_model_args("pretrained=x,load_in_4bit=True", WRAPPER) == {}


@pytest.mark.parametrize(("options", "message"), [
    ({"load_in_4bit": True, "load_in_8bit": True}, "both set"),
    ({"bnb_4bit_quant_type": "nf4"}, "without load_in_4bit=True"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "int3"}, "nf4"),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "float99"}, "torch dtype"),
    ({"load_in_4bit": "maybe"}, "true or false"),
    ({"load_in_2bit": True}, "unknown quantization option"),
])
def test_bad_quantization_options_say_what_to_do(options, message):
    with pytest.raises(ValueError, match=message):
        bnb_config(options)


def test_quantized_loading_injects_the_config_and_restores_from_pretrained(tmp_path):
    model, _ = tiny_llava()
    model.save_pretrained(tmp_path)
    original = PreTrainedModel.__dict__["from_pretrained"]
    config = bnb_config({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    with quantized_loading(config):
        loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32, device_map="")
    assert PreTrainedModel.__dict__["from_pretrained"] is original
    assert loaded.is_loaded_in_4bit and loaded.model.multi_modal_projector.linear_1.weight.dtype == torch.uint8
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    assert not getattr(plain, "is_loaded_in_4bit", False)
    with quantized_loading(None):
        assert PreTrainedModel.__dict__["from_pretrained"] is original


def test_bench_loads_the_preset_quantized_and_says_so(capsys):
    argv = ["bench", "--model", "tiny", "--load-in-4bit", "--bnb-4bit-quant-type", "nf4", "--method", "visionzip",
            "--keep", "8", "--repeats", "1", "--warmup", "0", "--decode-tokens", "1", "--threads", "1",
            "--no-progress", "--json"]
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert "bnb-4bit-nf4" in row["model"] and row["kept_tokens"] == 8 and row["dtype"] == "torch.float32"


def test_bench_quantization_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", "tiny", "--bnb-4bit-quant-type", "nf4"])
    assert "--load-in-4bit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench-accuracy", "--overlap"])
    assert "quantized model" in capsys.readouterr().err


def test_image_overlaps_are_jaccard_and_shared_share():
    def record(*kept):
        return SimpleNamespace(images=[SimpleNamespace(kept=torch.tensor(k)) for k in kept])

    pairs = image_overlaps([record([0, 1, 2, 3], [5])], [record([2, 3, 4, 5], [5])])
    assert pairs == [(2 / 6, 2 / 4), (1.0, 1.0)]
