"""What the Gemma 3 test files share (tests/test_gemma3.py: the vision stage; tests/test_gemma3_decoder.py: the
decoder stage): the prompts, the processor call, which methods run or decline, and the oracle's pieces -- the prompt
holding only the kept image tokens and the attention mask every LLM layer receives."""

import torch
from conftest import decoder_methods, two_stage_methods

from tokenprune.tiny_gemma3 import TOKENS_PER_IMAGE

IMG = "<start_of_image>"
PROMPT = f"USER : {IMG} what is in the image ? ASSISTANT :"
OTHER = f"USER : {IMG} describe a red circle and a blue square left of the dog ? ASSISTANT :"
GEN = dict(max_new_tokens=4, do_sample=False)
N = TOKENS_PER_IMAGE  # 6 x 6 pooled tokens per image (or crop)

# Every registered method that does NOT run on Gemma 3, with the reason its error names: a new decline fails here.
_NO_CLS = r"\[CLS\].*divprune"
VISION_DECLINES = {
    "fastervlm": _NO_CLS, "flowcut": _NO_CLS, "fopru": _NO_CLS, "recoverable": _NO_CLS, "visionzip": _NO_CLS,
    "holitom": "frames of a video.*divprune", "holitomouter": "frames of a video.*divprune",
}
# Decoder-stage and two-stage methods: all run (VFlowOpt's vision stage on the pooled attention map).
DECODER_RUNS = sorted(name for name in decoder_methods() + two_stage_methods() if name not in VISION_DECLINES)


def gemma3_inputs(processor, prompts, images, crops=False):
    """Processor output for a batch, one image per prompt (pan-and-scan crops with ``crops=True``)."""
    extra = {"do_pan_and_scan": True} if crops else {}
    return processor(text=prompts, images=[[im] for im in images], return_tensors="pt", padding=True, **extra)


def kept_prompt(model, inputs, kept):
    """The unpruned prompt holding only the kept image tokens: ``(kwargs, keep mask)``."""
    ids = inputs["input_ids"][0]
    keep = ids != model.config.image_token_id
    keep[(~keep).nonzero().squeeze(1)[kept]] = True
    return dict(input_ids=ids[keep][None], token_type_ids=inputs["token_type_ids"][:, keep]), keep


def layer_masks(model):
    """The attention mask each LLM layer receives, per call: ``{layer index: [mask, ...]}``."""
    seen: dict[int, list] = {}
    hooks = []
    for i, layer in enumerate(model.model.language_model.layers):
        def hook(module, args, kwargs, i=i):
            seen.setdefault(i, []).append(kwargs["attention_mask"])
        hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, hooks


def allowed_keys(mask: torch.Tensor) -> torch.Tensor:
    """``[q, kv]`` bool: which keys each query may attend to (eager: additive float; sdpa: bool)."""
    return mask[0, 0] == 0 if mask.dtype.is_floating_point else mask[0, 0]
