"""Training entry points (``python -m omni_fast.train``)."""
