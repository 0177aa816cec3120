"""Gemma 3 in vLLM with visual-token pruning after the projector, as ``enable_pruning`` prunes it
(``patches/gemma3.py``).

Processor: every image block (the image, and each pan-and-scan crop) is ``<start_of_image>``, the projector's
fixed ``mm_tokens_per_image`` soft tokens (256 on the released checkpoints), ``<end_of_image>``; the soft-token run
of each block is cut to its kept count, the delimiters and the ``"\\n\\n"`` around them stay. Model: the SigLIP
tower runs inside the HF path's probe (:class:`tokenprune.patches.clip_signals.ClipProbe`, on vLLM's fused
``qkv_proj`` seen as ``q_proj``/``k_proj``), its signals are average-pooled onto the LLM's token grid as the
projector pools the patches (``patches/gemma3.pool_probed``), and each block is one selection unit with the HF
path's layout (``placement="span"``: re-indexed positions, merged tokens projected by the projector's tail).

Gemma's bidirectional image block: vLLM builds it from each image's placeholder range (``is_embed``: exactly the
KEPT soft tokens, contiguous after pruning) for the attention backends that implement it (FlashAttention,
FlexAttention, Triton on GPUs). vLLM 0.32's CPU attention backend does not (``supports_mm_prefix`` is False and the
CPU platform selects it regardless): on the CPU build image tokens attend causally, pruned or not. Imported by
vLLM lazily.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from itertools import groupby

import torch
from vllm.model_executor.models.gemma3_mm import (
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing.processor import PromptUpdateDetails, replace_token_matches

from tokenprune.integrations.vllm.llava import _FusedPart
from tokenprune.integrations.vllm.options import CONFIG_KEY, VllmPruning, parse_options
from tokenprune.integrations.vllm.prompt_text import PromptTextModel, PromptTextProcessor, check_cache_type
from tokenprune.methods import ATTENTION_MAP, FEATURES, TEXT_EMBEDDINGS
from tokenprune.patches.clip_signals import ClipProbe, encoder_layers, resolve_layer
from tokenprune.patches.gemma3 import POOLED_SIGNALS, pool_groups, pool_probed, project_pooled
from tokenprune.patches.units import Unit
from tokenprune.patches.units import select_image as select_units


def _pruning(hf_config) -> VllmPruning | None:
    pruning = parse_options(getattr(hf_config, CONFIG_KEY, None), cls_token=False)  # SigLIP: no [CLS]
    return None if pruning is None or pruning.keeps_all else pruning


def cut_runs(ids: Sequence[int], token_id: int, kept: Callable[[int], int]) -> list[int]:
    """``ids`` with each maximal run of ``token_id`` cut to its first ``kept(run length)`` tokens."""
    out: list[int] = []
    for is_run, group in groupby(ids, key=lambda t: t == token_id):
        run = list(group)
        out += run[: kept(len(run))] if is_run else run
    return out


def newline_merged(ids: Sequence[int], newlines: Sequence[int]) -> list[int]:
    """vLLM's Gemma 3 rule for the ``"\\n\\n"`` an image block adds next to a prompt's newlines (``newlines``: the
    ids of ``"\\n"`` .. ``"\\n\\n\\n\\n"``): the runs merged as the tokenizer would write them."""
    one, two, three, four = newlines
    ids = replace_token_matches(list(ids), [one, two], [three])
    ids = replace_token_matches(ids, [two, one], [three])
    return replace_token_matches(ids, [two, two], [four])


class TokenpruneGemma3ProcessingInfo(Gemma3ProcessingInfo):
    def get_image_repl(self, *, image_width, image_height, processor, mm_kwargs) -> PromptUpdateDetails:
        details = super().get_image_repl(image_width=image_width, image_height=image_height, processor=processor,
                                         mm_kwargs=mm_kwargs)
        pruning = _pruning(self.get_hf_config())
        if pruning is None:
            return details
        crops = self.get_num_crops(image_width=image_width, image_height=image_height, processor=processor,
                                   mm_kwargs=mm_kwargs)
        if crops and TEXT_EMBEDDINGS in pruning.method.signals_needed(cls_token=False):
            raise ValueError(
                f"{pruning.method.name} selects each image block for the prompt text after it; a pan-and-scan image "
                f"({crops} crops) writes text between its blocks, which the vLLM plugin does not carry. Serve it "
                f"without do_pan_and_scan, or with a method that does not read the prompt (e.g. 'divprune')"
            )
        image_token_id = self.get_hf_config().image_token_index
        return PromptUpdateDetails.select_token_id(cut_runs(details.full, image_token_id, pruning.kept),
                                                   image_token_id)

    def get_num_image_tokens(self, *, image_width, image_height, processor, mm_kwargs) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height, processor=processor,
                                         mm_kwargs=mm_kwargs)
        pruning = _pruning(self.get_hf_config())
        per_block = processor.image_seq_length
        return n if pruning is None else (n // per_block) * pruning.kept(per_block)


class TokenpruneGemma3Processor(PromptTextProcessor, Gemma3MultiModalProcessor):
    def _tokenprune_text(self):
        pruning = _pruning(self.info.get_hf_config())
        if pruning is None or TEXT_EMBEDDINGS not in pruning.method.signals_needed(cls_token=False):
            return None
        config = self.info.get_hf_config()
        return config.boi_token_index, (config.image_token_index, config.boi_token_index, config.eoi_token_index)

    def _tokenprune_prompt(self, prompt: list[int]) -> list[int]:
        """Each ``<start_of_image>`` becomes ``"\\n\\n" <start_of_image> ... "\\n\\n"``, merged with neighbouring
        newlines as vLLM writes it: the text after an image starts with that ``"\\n\\n"`` in the HF prompt."""
        boi = self.info.get_hf_config().boi_token_index
        vocab = self.info.get_tokenizer().get_vocab()
        newlines = [vocab["\n" * n] for n in range(1, 5)]
        expanded: list[int] = []
        for token in prompt:
            expanded += [newlines[1], token, newlines[1]] if token == boi else [token]
        return newline_merged(expanded, newlines)


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneGemma3Processor, info=TokenpruneGemma3ProcessingInfo, dummy_inputs=Gemma3DummyInputsBuilder
)
class TokenpruneGemma3ForConditionalGeneration(PromptTextModel, Gemma3ForConditionalGeneration):
    """``Gemma3ForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image block."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune = _pruning(self.config)
        self.tokenprune_kept: list[torch.Tensor] = []  # the kept tokens of each image block of the last encoder call
        self._requests = []
        if self.tokenprune is None:
            return
        if TEXT_EMBEDDINGS in self.tokenprune.method.signals_needed(cls_token=False):
            check_cache_type(vllm_config)
        layers = encoder_layers(self.vision_tower)
        self._requests = [r for r in self.tokenprune.method.requests(cls_token=False) if r.name in POOLED_SIGNALS]
        for request in self._requests:  # a bad layer fails at engine start, not mid-request
            resolve_layer(request.layer, len(layers) - 1, len(layers))
        if self._requests:
            for layer in layers:
                layer.self_attn.q_proj = _FusedPart(layer.self_attn, 0)
                layer.self_attn.k_proj = _FusedPart(layer.self_attn, 1)

    def get_encoder_cudagraph_config(self):
        # Encoder CUDA graphs bypass _process_image_input (no pruning): off while pruning.
        config = super().get_encoder_cudagraph_config()
        return config if self.tokenprune is None else dataclasses.replace(config, modalities=[])

    def _process_image_input(self, image_input) -> list[torch.Tensor]:
        if self.tokenprune is None:
            return super()._process_image_input(image_input)
        pixel_values, counts = image_input["pixel_values"], image_input["num_patches"].tolist()
        projector = self.multi_modal_projector
        layers = len(encoder_layers(self.vision_tower))
        groups = pool_groups(projector) if any(r.name == ATTENTION_MAP for r in self._requests) else None
        with ClipProbe(self.vision_tower, self._requests, layers - 1, map_groups=groups) as probe:
            vision = self.vision_tower(pixel_values)
        embeds = projector(vision)  # [blocks, T*T, D]
        norm = self.vision_tower.vision_model.post_layernorm
        per_block = pool_probed(projector, norm, self._requests, layers,
                                probe.per_image(drop_cls=False) or [{} for _ in range(embeds.shape[0])])
        side = projector.tokens_per_side
        out, block = [], 0
        self.tokenprune_kept = []
        for item, count in enumerate(counts):
            text = self._text_signals(item, embeds.device, cls_token=False)
            rows = []
            for crop in range(count):
                feats = embeds[block]
                n, k = feats.shape[0], self.tokenprune.kept(feats.shape[0])
                chosen = select_units(
                    self.tokenprune.method, feats, [Unit(torch.arange(n), (side, side))], [k],
                    [{FEATURES: feats, **per_block[block], **text}], image_index=crop, row=0, index_in_row=crop,
                    cls_token=False, placement="span", project=functools.partial(project_pooled, projector, like=feats),
                )
                if chosen.features.shape[0] != k:
                    raise RuntimeError(f"{self.tokenprune.method.name} gave {chosen.features.shape[0]} rows for "
                                       f"k={k}, n={n}; vLLM reserved {k} placeholders for this image block")
                rows.append(chosen.features)
                self.tokenprune_kept.append(chosen.kept)
                block += 1
            out.append(torch.cat(rows))
        return out
