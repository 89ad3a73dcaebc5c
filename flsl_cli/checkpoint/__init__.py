"""Checkpoints: atomic writes committed by a manifest, safe loads, retention."""
