"""Throughput measurements (`flsl bench ...`)."""
