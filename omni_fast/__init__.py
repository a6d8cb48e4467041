"""omni_fast: fine-tune Qwen2.5-Omni on MindSpore with compiled hot paths."""

__version__ = "0.1.0"
