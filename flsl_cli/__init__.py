"""flsl: pretrain Vision Transformers with FLSL (Feature-Level Self-Supervised Learning)."""

__version__ = "0.1.0"
