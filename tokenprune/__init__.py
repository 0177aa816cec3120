"""tokenprune: training-free visual-token pruning for Hugging Face vision-language models.

    from tokenprune import enable_pruning
    enable_pruning(model, method="divprune", keep=0.11)
"""

from tokenprune.api import PruningHandle, disable_pruning, enable_pruning, get_handle, list_methods, pruning
from tokenprune.config import PruningConfig

__version__ = "0.1.0"

__all__ = [
    "PruningConfig", "PruningHandle", "__version__", "disable_pruning", "enable_pruning", "get_handle",
    "list_methods", "pruning",
]
