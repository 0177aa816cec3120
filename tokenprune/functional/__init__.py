"""The papers' selection rules as plain tensor functions.

One image at a time, no batch dimension, any float dtype (scores in fp32). Each returns a 1-D ``torch.long``
tensor of kept indices, sorted ascending, without duplicates; ``k >= N`` returns ``arange(N)``; exact ties go to
the lowest index.
"""

from tokenprune.functional.attention import fastervlm
from tokenprune.functional.baselines import random, uniform
from tokenprune.functional.diversity import cosine_distance, divprune

__all__ = ["cosine_distance", "divprune", "fastervlm", "random", "uniform"]
