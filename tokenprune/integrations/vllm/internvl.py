"""InternVL3 in the Hugging Face format (``InternVLForConditionalGeneration``; vLLM serves it with its InternS1 model)
with visual-token pruning after the projector, as ``enable_pruning`` prunes it (``patches/internvl.py``).

Processor: each image is ``<img>`` + ``image_seq_length`` ``<IMG_CONTEXT>`` per tile (the aspect-ratio grid, then the
thumbnail when there is more than one tile) + ``</img>``; the context run is cut to the sum of the selection units'
budgets (per tile, or one pool per image: ``scope``, else the method's paper convention), which follow from the
tile count alone. Model: InternViT runs inside the HF path's probe (:class:`tokenprune.patches.clip_signals.ClipProbe`:
[CLS] attention, attention received, attention map, hidden states, keys, recomputed from each layer's own
``q_proj``/``k_proj``), the signals are carried to the pixel-shuffled tokens by vLLM's own ``pixel_shuffle`` applied
to patch indices (``patches/internvl.shuffled_patch_groups`` / ``shuffled_signal``), and each image is selected
with the HF path's units and span layout (positions re-indexed; merged tokens through the projector). Imported by
vLLM lazily.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing.processor import PromptReplacement, PromptUpdateDetails

from tokenprune.integrations.vllm.gemma3 import cut_runs
from tokenprune.integrations.vllm.options import CONFIG_KEY, VllmPruning, parse_options
from tokenprune.integrations.vllm.placeholders import image_embeddings
from tokenprune.integrations.vllm.prompt_text import PromptTextModel, PromptTextProcessor, check_cache_type
from tokenprune.methods import FEATURES, TEXT_EMBEDDINGS, VISION_HIDDEN
from tokenprune.patches.clip_signals import PROBE_SIGNALS, ClipProbe, encoder_layers, resolve_layer
from tokenprune.patches.internvl import InternVLAdapter, shuffled_patch_groups, shuffled_signal, tile_layout
from tokenprune.patches.llava_next import selection_units, unit_signals
from tokenprune.patches.units import select_image as select_units


def _pruning(hf_config) -> VllmPruning | None:
    pruning = parse_options(getattr(hf_config, CONFIG_KEY, None), cls_token=True)  # InternViT has [CLS]
    if pruning is None or pruning.keeps_all:
        return None
    reason = InternVLAdapter.method_reason(pruning.method)
    if reason:
        raise ValueError(reason)
    return pruning


def kept_in_image(pruning: VllmPruning, n_tiles: int, per_tile: int) -> int:
    """Placeholders of an image of ``n_tiles`` tiles: the sum of its units' budgets (``enable_pruning``'s rule)."""
    units, _ = selection_units(tile_layout(n_tiles, per_tile), pruning.method, pruning.scope)
    return sum(pruning.kept(u.index.numel()) for u in units)


class TokenpruneInternVLProcessingInfo(InternS1ProcessingInfo):
    def get_num_image_tokens(self, *, image_width, image_height, processor, mm_kwargs) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height, processor=processor,
                                         mm_kwargs=mm_kwargs)
        pruning = _pruning(self.get_hf_config())
        per_tile = processor.image_seq_length
        return n if pruning is None else kept_in_image(pruning, n // per_tile, per_tile)


class TokenpruneInternVLProcessor(PromptTextProcessor, InternS1MultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        pruning = _pruning(self.info.get_hf_config())
        if pruning is None:
            return updates
        if image_embeddings(mm_items):
            raise ValueError("the vLLM plugin does not prune InternVL image embeddings (image_embeds); send pixels")
        context = self.info.get_hf_config().image_token_id
        per_tile = self.info.get_hf_processor(**hf_processor_mm_kwargs).image_seq_length
        out = []
        for update in updates:
            if update.modality == "image":
                def replacement(item_idx: int, original=update.replacement) -> PromptUpdateDetails:
                    full = original(item_idx).full
                    tiles = sum(t == context for t in full) // per_tile
                    ids = cut_runs(full, context, lambda n, t=tiles: kept_in_image(pruning, t, per_tile))
                    return PromptUpdateDetails.select_token_id(ids, context)
                update = PromptReplacement(modality="image", target=update.target, replacement=replacement)
            out.append(update)
        return out

    def _tokenprune_text(self):
        pruning = _pruning(self.info.get_hf_config())
        if pruning is None or TEXT_EMBEDDINGS not in pruning.method.signals_needed(cls_token=True):
            return None
        context = self.info.get_hf_config().image_token_id
        return context, (context,)

    def _tokenprune_prompt(self, prompt: list[int]) -> list[int]:
        """``<IMG_CONTEXT>`` -> ``<img>`` ... ``</img>``, as the HF processor writes an image (``</img>`` is text to
        the HF path)."""
        context = self.info.get_hf_config().image_token_id
        tokenizer = self.info.get_tokenizer()
        start, end = (tokenizer.convert_tokens_to_ids(t) for t in (tokenizer.start_image_token,
                                                                     tokenizer.end_image_token))
        expanded: list[int] = []
        for token in prompt:
            expanded += [start, token, end] if token == context else [token]
        return expanded


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneInternVLProcessor, info=TokenpruneInternVLProcessingInfo, dummy_inputs=InternS1DummyInputsBuilder
)
class TokenpruneInternVLForConditionalGeneration(PromptTextModel, InternS1ForConditionalGeneration):
    """vLLM's InternVL (HF format) model that keeps ``hf_config.tokenprune``'s selection of each image's tiles."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune = _pruning(self.config)
        self.tokenprune_kept: list[torch.Tensor] = []  # the kept tokens of each image of the last encoder call
        self._requests = []
        if self.tokenprune is None:
            return
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"tokenprune supports InternVL with vision_feature_select_strategy='default' (the [CLS] token dropped "
                f"before the pixel shuffle, as in every released checkpoint); got "
                f"{self.config.vision_feature_select_strategy!r}"
            )
        if TEXT_EMBEDDINGS in self.tokenprune.method.signals_needed(cls_token=True):
            check_cache_type(vllm_config)
        n_layers = len(encoder_layers(self.vision_tower))
        self._feature_layer = self.config.vision_feature_layer % n_layers
        self._requests = [r for r in self.tokenprune.method.requests(cls_token=True) if r.name in PROBE_SIGNALS]
        for request in self._requests:  # a bad layer fails at engine start, not mid-request
            resolve_layer(request.layer, self._feature_layer, n_layers)

    def _process_vision_input(self, image_input):
        if self.tokenprune is None or image_input["type"] != "pixel_values":  # videos: unpruned
            return super()._process_vision_input(image_input)
        with ClipProbe(self.vision_tower, self._requests, self._feature_layer) as probe:
            tiles = self.extract_feature(image_input["pixel_values"])  # [T, t, D]
        per_tile = probe.per_image(drop_cls=True) if self._requests else []
        if per_tile:
            vision = self.config.vision_config
            groups = shuffled_patch_groups(self.pixel_shuffle, self.downsample_ratio,
                                           vision.image_size[0] // vision.patch_size[0])
            norm = self.vision_tower.layernorm if self.config.vision_feature_layer == -1 else torch.nn.Identity()
            with torch.no_grad():
                per_tile = [{k: shuffled_signal(k.split("@")[0], norm(v) if k == VISION_HIDDEN else v, groups)
                             for k, v in s.items()} for s in per_tile]
        out, first, self.tokenprune_kept = [], 0, []
        for item, n_tiles in enumerate(image_input["num_patches"].tolist()):
            feats = tiles[first:first + n_tiles].reshape(-1, tiles.shape[-1])
            mine = per_tile[first:first + n_tiles]
            first += n_tiles
            layout = tile_layout(n_tiles, tiles.shape[1])
            units, _ = selection_units(layout, self.tokenprune.method, self.tokenprune.scope)
            budgets = [self.tokenprune.kept(u.index.numel()) for u in units]
            text = self._text_signals(item, feats.device, cls_token=True)
            signals = [{FEATURES: feats[u.index.to(feats.device)], **text, **unit_signals(layout, u, mine)}
                       for u in units]
            chosen = select_units(
                self.tokenprune.method, feats, units, budgets, signals, image_index=0, row=0, index_in_row=0,
                cls_token=True, project=self.multi_modal_projector, placement="span",
            )
            if chosen.features.shape[0] != sum(budgets):
                raise RuntimeError(f"{self.tokenprune.method.name} gave {chosen.features.shape[0]} rows; vLLM "
                                   f"reserved {sum(budgets)} placeholders for this image")
            out.append(chosen.features)
            self.tokenprune_kept.append(chosen.kept)
        return tuple(out)
