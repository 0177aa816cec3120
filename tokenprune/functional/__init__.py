"""The papers' selection rules as plain tensor functions.

One image at a time, no batch dimension, any float dtype (scores in fp32). Each returns a 1-D ``torch.long``
tensor of kept indices, sorted ascending, without duplicates; ``k >= N`` returns ``arange(N)``; exact ties go to
the lowest index. Merging methods also return the merged rows.
"""

from tokenprune.functional.attention import fastervlm, fopru
from tokenprune.functional.baselines import random, uniform
from tokenprune.functional.catp import catp_context, catp_context_scores, catp_query, catp_submodular
from tokenprune.functional.chunks import holov, holov_chunk_count
from tokenprune.functional.corematching import core_match, core_neurons, corematching, elbow_value, token_core_neurons
from tokenprune.functional.coverage import mmtok
from tokenprune.functional.dart import dart, dart_count
from tokenprune.functional.decoder_rules import fastv, layer_average, pdrop_counts, pdrop_ratio
from tokenprune.functional.diversity import cosine_distance, divprune, kcenter, unit_rows
from tokenprune.functional.dpp import cdpruner, instruction_relevance
from tokenprune.functional.feather import feather, feather_counts, feather_uniform
from tokenprune.functional.flow import flowcut_scores, flowcut_step
from tokenprune.functional.hierarchy import hiprune, hiprune_anchor_count
from tokenprune.functional.holitom import holitom_inner, holitom_outer, static_windows
from tokenprune.functional.merging import contextual_merge, visiondrop, visionzip, visionzip_with_assign
from tokenprune.functional.recovery import lof_outlier_fraction, recoverable
from tokenprune.functional.sparsevlm import (
    ADAPTINFER_TABLE,
    SPARSEVLM_TABLE,
    TABLE_TOKENS,
    adaptinfer,
    adaptinfer_scores,
    dpc_knn,
    schedule_counts,
    sparsevlm_raters,
    sparsevlm_recycle,
)
from tokenprune.functional.todre import todre_drop_all, todre_text_to_visual
from tokenprune.functional.transprune import transprune, transprune_counts, transprune_scale, transprune_ttv
from tokenprune.functional.vflowopt import vflowopt_importance, vflowopt_llm, vflowopt_llm_counts, vflowopt_recycle

__all__ = [
    "ADAPTINFER_TABLE", "SPARSEVLM_TABLE", "TABLE_TOKENS", "adaptinfer", "adaptinfer_scores", "dpc_knn",
    "schedule_counts", "sparsevlm_raters", "sparsevlm_recycle", "vflowopt_importance", "vflowopt_llm",
    "vflowopt_llm_counts", "vflowopt_recycle",
    "cdpruner", "contextual_merge", "cosine_distance", "divprune", "fastervlm", "fastv", "flowcut_scores",
    "flowcut_step", "fopru", "hiprune", "layer_average", "pdrop_counts", "pdrop_ratio",
    "hiprune_anchor_count", "holov", "holov_chunk_count", "instruction_relevance", "kcenter", "lof_outlier_fraction",
    "mmtok", "random", "recoverable", "uniform", "visiondrop", "visionzip", "visionzip_with_assign",
    "dart", "dart_count", "feather", "feather_counts", "feather_uniform", "todre_drop_all", "todre_text_to_visual",
    "transprune", "transprune_counts", "transprune_scale", "transprune_ttv", "unit_rows",
    "core_match", "core_neurons", "corematching", "elbow_value", "token_core_neurons",
    "holitom_inner", "holitom_outer", "static_windows",
    "catp_context", "catp_context_scores", "catp_query", "catp_submodular",
]
