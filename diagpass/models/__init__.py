"""Reference recurrent-memory transformers.

``ARMT`` (per-layer associative memory over a Hugging Face causal LM, diagonal-
batchable), ``RMT`` (memory from the last layer to the first, not diagonal-batchable)
and ``RecurrentTransformer``, a pure-torch family with many memory kinds and code
shapes (``FamilyConfig``) for property tests. Importing this package does not
import ``transformers``; building or wrapping a model does (lazily, in ``hf_layers``).
"""

from .armt import ARMT, AssociativeMemoryLayer, build_armt, dpfp, randomize_memory_
from .family import FamilyConfig, RecurrentTransformer, build_family_model, dependence_pattern, is_diagonal_batchable
from .rmt import RMT, build_rmt

__all__ = [
    "ARMT",
    "AssociativeMemoryLayer",
    "FamilyConfig",
    "RMT",
    "RecurrentTransformer",
    "build_armt",
    "build_family_model",
    "build_rmt",
    "dependence_pattern",
    "dpfp",
    "is_diagonal_batchable",
    "randomize_memory_",
]
