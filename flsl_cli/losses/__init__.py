"""The FLSL objective (FLSL-method.md), as pure functions of tokens, heads and settings."""
