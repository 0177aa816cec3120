"""Synthetic VQA: scenes of coloured shapes (:mod:`.scenes`), single-word questions (:mod:`.questions`) and the
training recipe of the shipped model (:mod:`.train`)."""
