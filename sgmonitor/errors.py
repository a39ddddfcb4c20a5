"""The error families every layer shares.

``GuestDataError`` is the one family for guest data that is hostile or inconsistent:
an IDS that catches it reports "could not check", never "clean".
"""

from __future__ import annotations


class SGMonitorError(Exception):
    """Base of every error SGmonitor raises on purpose."""


class GuestDataError(SGMonitorError):
    """Guest memory could not be read or did not make sense (corrupt, hostile, racing)."""


class PhysicalAccessError(GuestDataError):
    """A guest-physical range is not RAM, or lies outside the memory source."""

    def __init__(self, address: int, size: int, why: str = "not guest RAM") -> None:
        super().__init__(f"guest-physical {address:#x}+{size:#x}: {why}")
        self.address = address
        self.size = size


class PageFault(GuestDataError):
    """A guest-virtual address does not translate: non-canonical or not present."""

    def __init__(self, address: int, level: int, entry: int | None, why: str) -> None:
        where = f" at level {level} (entry {entry:#x})" if entry is not None else ""
        super().__init__(f"guest-virtual {address:#x}: {why}{where}")
        self.address = address
        self.level = level
        self.entry = entry


class ValidationError(GuestDataError):
    """A walk of guest data structures found a loop, a broken link or a wild pointer."""
