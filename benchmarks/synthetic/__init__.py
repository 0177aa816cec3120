"""The training recipe of the shipped synthetic-VQA model (``tokenprune/assets/synth-llava``): run from the repository
root as ``python -m benchmarks.synthetic.train`` (``make train-synthetic``). Its data (scenes, questions) and the
loader of the trained model are in the package (:mod:`tokenprune.bench.synthetic`, :mod:`tokenprune.tiny_models`)."""
