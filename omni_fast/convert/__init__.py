"""Weight conversion between Hugging Face Qwen2.5-Omni and MindSpeed-MM checkpoints (``mm-convert``).

See :mod:`omni_fast.convert.qwen2_5_omni` for the rules and the public functions: ``hf_to_mm``, ``mm_to_hf``
(directory to directory), ``read_mm_thinker`` and ``write_mm_thinker`` (in memory, for the trainer).
"""

from omni_fast.convert.layout import ParallelLayout, iteration_dir_name, rank_dir_name
from omni_fast.convert.qwen2_5_omni import hf_to_mm, mm_to_hf, read_mm_thinker, write_mm_thinker

__all__ = [
    "ParallelLayout",
    "hf_to_mm",
    "iteration_dir_name",
    "mm_to_hf",
    "rank_dir_name",
    "read_mm_thinker",
    "write_mm_thinker",
]
