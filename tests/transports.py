"""An in-process PageTransport for tests: a real PageServer, every call recorded.

The secure modes put the sealed channel between ``RemoteMemory`` and ``PageServer``;
tests call the server directly and count the calls themselves, so crossing counts are
checked independently of ``RemoteMemory``'s own counters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sgmonitor.enclave.memory import RemoteMemory
from sgmonitor.errors import PageFault
from sgmonitor.hypervisor.pages import ListWalk, PageServer, WalkedList


class CountingTransport:
    """Implements ``sgmonitor.enclave.memory.PageTransport`` over a ``PageServer``."""

    def __init__(self, server: PageServer) -> None:
        self.server = server
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.scans = 0

    def read_pages(self, addresses: Sequence[int]) -> list[bytes | PageFault]:
        self.calls.append(("read_pages", tuple(addresses)))
        return self.server.read_pages(addresses)

    def follow_list(self, walk: ListWalk, *, pages: Sequence[int] = ()) -> WalkedList:
        self.calls.append(("follow_list", (*walk.layout, walk.limit, walk.max_pages)))
        return self.server.follow_list(walk, pages=pages)

    def begin_scan(self) -> None:
        self.scans += 1
        self.server.refresh()


class StreamingTransport(CountingTransport):
    """A CountingTransport that also takes list walks ahead (``follow_list_later``), as
    the sealed channel does: the walk (and the next window it announces, ``then``, last)
    is recorded when asked for, and its answer when taken."""

    def __init__(self, server: PageServer) -> None:
        super().__init__(server)
        self.taken: list[tuple[int, ...]] = []  # the walks whose answers were taken

    def follow_list_later(
        self, walk: ListWalk, *, pages: Sequence[int] = (), then: int = 0
    ) -> Callable[[], WalkedList]:
        args = (*walk.layout, walk.limit, walk.after, walk.max_pages, then)
        self.calls.append(("follow_list_later", args))
        found = self.server.follow_list(walk, pages=pages)

        def answer() -> WalkedList:
            self.taken.append((*walk.layout, walk.limit, walk.after))
            return found

        return answer


class NoPrefetch:
    """A RemoteMemory with its prefetch hidden: walks read page by page, as without it."""

    def __init__(self, memory: RemoteMemory) -> None:
        self.memory = memory

    def read(self, address: int, size: int) -> bytes:
        return self.memory.read(address, size)
