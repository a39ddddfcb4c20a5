"""The one narrow interface every typed kernel read goes through."""

from __future__ import annotations

from typing import Protocol


class AddressSpace(Protocol):
    """Guest-virtual kernel memory.

    ``read`` returns exactly ``size`` bytes or raises :class:`sgmonitor.errors.PageFault`
    (a ``GuestDataError``) when any byte of the range does not translate. The transport
    underneath (in-process page walk, sealed pages from the hypervisor service) is
    invisible to callers.
    """

    def read(self, address: int, size: int) -> bytes: ...
