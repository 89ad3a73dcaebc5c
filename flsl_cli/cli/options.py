"""Values of command-line options that several commands read the same way."""

from __future__ import annotations


def comma_list(value: str) -> list[str]:
    """The items of a comma-separated option value, e.g. "10, 20,,100" -> ["10", "20", "100"]."""
    return [part.strip() for part in value.split(",") if part.strip()]
