"""The HF-transformers side of the vLLM tests: a saved checkpoint's model and processed request with greedy
``generate`` (:class:`HFModel`), the same under ``enable_pruning`` (:func:`enable_pruning_generate`), and for the
end-to-end tests an independent pruned forward that drops the same image tokens (LLaVA: positions re-indexed, as vLLM
does; Qwen: each kept token keeps its column of HF's own ``get_rope_index`` on the unpruned prompt) and decodes
greedily without a cache (:class:`HFReference`)."""

from __future__ import annotations

import math

import torch
from cases import MAX_TOKENS, PROMPTS, Run, image

from tokenprune.integrations.vllm.options import VllmPruning
from tokenprune.integrations.vllm.selection import select_image
from tokenprune.methods import FEATURES, TEXT_EMBEDDINGS
from tokenprune.patches.base import text_embeddings
from tokenprune.patches.units import ImageSelection
from tokenprune.record import ImageRecord


class HFModel:
    """A saved checkpoint on the HF side (eager attention) and one processed request (``inputs``: the prompt and its
    image, or what a test puts there), with greedy ``generate``."""

    def __init__(self, path: str, prompt: str, image, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
        # vLLM does not apply generation_config.suppress_tokens (the tiny Qwen3 models suppress their vision ids)
        self.model.generation_config.suppress_tokens = None
        self.inputs = self.processor(text=prompt, images=image, return_tensors="pt")

    @torch.no_grad()
    def generate(self, inputs: dict | None = None) -> Run:
        """``MAX_TOKENS`` greedy tokens (no EOS stop) and their logprobs, for ``inputs`` (default: ``self.inputs``)."""
        inputs = self.inputs if inputs is None else inputs
        out = self.model.generate(
            **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
            output_logits=True, return_dict_in_generate=True,
        )
        prompt_len = inputs["input_ids"].shape[1]
        tokens = out.sequences[0, prompt_len:].tolist()
        logprobs = [float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(out.logits, tokens, strict=True)]
        return Run(prompt_len, tokens, logprobs)


def enable_pruning_generate(hf: HFModel, method: str, keep, **options) -> tuple[Run, Run, ImageRecord]:
    """``(unpruned, pruned, record)``: ``hf``'s generation without pruning, then under ``enable_pruning(method, keep,
    **options)`` (removed afterwards), and ``handle.last``'s record of the first image (or video)."""
    from tokenprune import disable_pruning, enable_pruning

    vanilla = hf.generate()
    handle = enable_pruning(hf.model, method=method, keep=keep, **options)
    try:
        return vanilla, hf.generate(), handle.last.images[0]
    finally:
        disable_pruning(hf.model)


class HFReference(HFModel):
    """The HF side of the end-to-end tests' families, keyed by name (the prompt and image of ``cases.py``)."""

    def __init__(self, path: str, name: str):
        super().__init__(path, PROMPTS[name], image(name))
        self.name = name
        self.qwen = name.startswith("qwen")
        self.image_token_id = self.model.config.image_token_id

    @torch.no_grad()
    def signals(self, pruning: VllmPruning | None):
        """``(features [N, D], {signal key: tensor}, grid)`` of the one image, computed the HF way: the probes of
        ``enable_pruning`` (``patches/clip_signals.py``, ``patches/qwen_signals.py``) on the HF tower."""
        from tokenprune.patches.clip_signals import PROBE_SIGNALS, ClipProbe
        from tokenprune.patches.qwen_signals import QwenProbe

        model = self.model.model
        cls_token = not self.qwen
        requests = list(pruning.method.requests(cls_token=cls_token)) if pruning else []
        if self.qwen:
            grid_thw = self.inputs["image_grid_thw"]
            with QwenProbe(model.visual, requests, grid_thw) as probe:
                feats = model.get_image_features(self.inputs["pixel_values"], grid_thw).pooler_output[0]
            merge = self.model.config.vision_config.spatial_merge_size
            _, h, w = grid_thw[0].tolist()
            signals, grid = {FEATURES: feats, **probe.per_item()[0]}, (h // merge, w // merge)
            placeholders = (self.image_token_id, self.model.config.video_token_id)
        else:
            config = self.model.config
            layers = config.vision_config.num_hidden_layers
            probed = [r for r in requests if r.name in PROBE_SIGNALS]
            with ClipProbe(model.vision_tower, probed, config.vision_feature_layer % layers) as probe:
                vision = model.vision_tower(self.inputs["pixel_values"], output_hidden_states=True)
            feats = model.multi_modal_projector(vision.hidden_states[config.vision_feature_layer][:, 1:])[0]
            signals = {FEATURES: feats, **(probe.per_image(drop_cls=True)[0] if probed else {})}
            side = math.isqrt(feats.shape[0])
            grid = (side, side)
            placeholders = (self.image_token_id,)
        if pruning and TEXT_EMBEDDINGS in pruning.method.signals_needed(cls_token=cls_token):
            ids = self.inputs["input_ids"]
            end = int((ids[0] == self.image_token_id).nonzero().max())
            signals[TEXT_EMBEDDINGS] = text_embeddings(self.model, ids, None, 0, end, placeholders)
        return feats, signals, grid

    def selection(self, pruning: VllmPruning) -> ImageSelection:
        feats, signals, grid = self.signals(pruning)
        project = None if self.qwen else self.model.model.multi_modal_projector
        return select_image(pruning, feats, signals, grid, cls_token=not self.qwen, project=project)

    @torch.no_grad()
    def pruned(self, selection: ImageSelection, reindex_positions: bool = False) -> Run:
        """Greedy decode of the prompt with only the selected image rows (no KV cache: full recompute per step).
        ``reindex_positions`` (Qwen): give the pruned sequence fresh contiguous positions instead (a wrong variant
        the tests use to show that the comparison sees positions)."""
        rows = selection.features
        ids = self.inputs["input_ids"][0]
        is_image = ids == self.image_token_id
        keep = ~is_image
        slots = is_image.nonzero()[:, 0]
        # Qwen: the kept tokens' own columns (their positions matter); LLaVA (re-indexed): the first k slots
        keep[slots[selection.slots] if self.qwen else slots[: rows.shape[0]]] = True
        embed = self.model.get_input_embeddings()
        embeds = embed(ids[keep])[None].clone()
        embeds[0, ids[keep] == self.image_token_id] = rows
        positions = None
        if self.qwen:
            full, _ = self.model.model.get_rope_index(
                self.inputs["input_ids"], self.inputs["mm_token_type_ids"], image_grid_thw=self.inputs["image_grid_thw"]
            )
            positions = full[:, :, keep]  # [3, 1, L']
            if reindex_positions:
                positions = torch.arange(positions.shape[-1]).view(1, 1, -1).expand(3, 1, -1)
        lm = self.model.model.language_model
        tokens, logprobs = [], []
        for _ in range(MAX_TOKENS):
            kwargs = {} if positions is None else {"position_ids": positions}
            hidden = lm(inputs_embeds=embeds, **kwargs).last_hidden_state[:, -1]
            logp = torch.log_softmax(self.model.lm_head(hidden).float(), -1)[0]
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
            if positions is not None:
                positions = torch.cat([positions, (positions.max() + 1).view(1, 1, 1).expand(3, 1, 1)], dim=-1)
        return Run(int(keep.sum()), tokens, logprobs)
