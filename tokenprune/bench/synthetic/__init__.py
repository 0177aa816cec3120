"""Synthetic VQA: scenes of coloured shapes (:mod:`.scenes`) and single-word questions about them (:mod:`.questions`),
what ``tokenprune bench-accuracy``, ``make demo`` and the notebooks ask the shipped trained model
(:func:`tokenprune.tiny_models.trained_llava`). The recipe that trained it is not part of the package: it lives in
the repository's ``benchmarks/synthetic/`` (``make train-synthetic``)."""
