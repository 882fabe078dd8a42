"""Units, defined once: bytes per GiB (every `_gib` value in the plan, the metrics and the probe)."""

GIB = 2**30
"""Bytes in a gibibyte."""
