"""The Qwen2.5-Omni Thinker in MindSpore."""

from omni_fast.model.thinker import PreparedBatch, Qwen2_5OmniThinker, ThinkerOutput

__all__ = ["PreparedBatch", "Qwen2_5OmniThinker", "ThinkerOutput"]
