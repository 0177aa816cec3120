"""What the Qwen3 test files share (tests/test_qwen3.py: the vision stage; tests/test_qwen3_decoder.py: the decoder
stage; tests/test_qwen3_shapes.py: the released depths and the FLOPs counts): the prompts, the vision-stage methods
that run without a [CLS] token, and a count of the hooks."""

from conftest import runnable_methods, runs_without_cls

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"USER : {IMG}what is in the image ? ASSISTANT :"
OTHER = f"USER : {IMG}\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"
GEN = dict(max_new_tokens=4, do_sample=False)

METHODS = [m for m in runnable_methods("qwen3_vl") if runs_without_cls(m)]  # every vision-stage method that runs
NO_CLS = [m for m in runnable_methods("qwen3_vl") if not runs_without_cls(m)]  # declined: they rank by the [CLS] row


def hook_count(model) -> int:
    """Forward hooks and pre-hooks over every module."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
