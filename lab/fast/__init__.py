"""Fast paths for the transformers reference recurrences (switchable; outputs match the reference)."""

from lab.fast.scan import enable, enabled, linear_scan

__all__ = ["enable", "enabled", "linear_scan"]
