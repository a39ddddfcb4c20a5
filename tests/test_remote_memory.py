"""RemoteMemory over a PageServer on a real guest: the same process list as the
in-process walk, in few crossings.

The transport here is in-process (a PageServer called directly); the sealed socket path
puts the channel in between without changing what crosses, so the crossing counts
measured here are those of the secure modes.
"""

from __future__ import annotations

import time

import pytest
from guests import MAIN, GuestUnderTest, only
from transports import CountingTransport, NoPrefetch

from sgmonitor.enclave.memory import CacheStats, RemoteMemory
from sgmonitor.guest.paging import PageWalker, VirtualMemory
from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.hypervisor.pages import PageServer
from sgmonitor.ids.pslist import ProcessRecord, list_processes
from sgmonitor.kernel.address_space import AddressSpace
from sgmonitor.kernel.btf import Btf
from sgmonitor.kernel.kernel import Kernel, btf_from_guest

pytestmark = pytest.mark.guest

MIB = 1 << 20


def scan(
    memory: RemoteMemory, view: AddressSpace, btf: Btf, symbols: dict[str, int]
) -> tuple[list[ProcessRecord], CacheStats, float]:
    """One periodic scan from an empty cache: processes, its counters, its time."""
    memory.begin_scan()
    before = memory.stats()
    start = time.perf_counter()
    found = list_processes(Kernel(view, btf, symbols))
    return found, memory.stats().since(before), time.perf_counter() - start


@only(MAIN)
def test_remote_memory_gives_the_same_processes_in_few_crossings(guest: GuestUnderTest) -> None:
    live = QemuGuest(guest.info.qmp)
    symbols = guest.truth.symbols  # as the guest printed them itself
    try:
        with live.paused():
            local = VirtualMemory(PageWalker.for_kernel(live, live.registers()))
            raw_btf = btf_from_guest(local, symbols)
            btf = Btf(raw_btf)
            expected = list_processes(Kernel(local, btf, symbols))
            start = time.perf_counter()  # a second, warm scan: BTF lookups are cached
            assert list_processes(Kernel(local, btf, symbols)) == expected
            traditional = time.perf_counter() - start
            n = len(expected)

            transport = CountingTransport(PageServer(live))
            remote = RemoteMemory(transport)
            remote.begin_scan()
            assert btf_from_guest(remote, symbols) == raw_btf  # ~1,000 pages, batched
            start, stop = symbols["__start_BTF"], symbols["__stop_BTF"]
            pages = ((stop - 1) >> 12) - (start >> 12) + 1
            assert [len(a) for _, a in transport.calls] == [
                min(pages, 1024),
                *[pages - 1024][: pages > 1024],
            ]

            results = {}
            for label, budget, prefetch in [
                ("prefetch 32 MiB", 32 * MIB, True),
                ("prefetch 1 MiB", MIB, True),
                ("no prefetch 32 MiB", 32 * MIB, False),
            ]:
                memory = RemoteMemory(CountingTransport(PageServer(live)), budget)
                view = memory if prefetch else NoPrefetch(memory)
                for _ in range(2):  # the second scan reads every page afresh
                    found, stats, seconds = scan(memory, view, btf, symbols)
                    assert found == expected, label
                    results.setdefault(label, []).append((stats, seconds))
                first, second = results[label][0][0], results[label][1][0]
                # fewer pages: only the part of each task_struct the first scan read
                if prefetch:
                    assert second.pages_fetched < first.pages_fetched, label
                else:
                    assert second.pages_fetched == first.pages_fetched
                # ... but knows which: the first scan's misses come in its first crossing
                assert second.crossings <= first.crossings
                if prefetch and budget == 32 * MIB:
                    assert second.crossings == 1 and second.predicted_used == first.misses
                assert memory.transport.scans == 2  # type: ignore[attr-defined]
    finally:
        live.close()

    print(f"\n{n} processes; traditional scan {traditional * 1e3:.1f} ms")
    for label, runs in results.items():
        stats, seconds = runs[-1]
        print(f"{label}, first scan: {runs[0][0].crossings} crossings")
        print(
            f"{label}: {stats.crossings} crossings ({stats.prefetches} prefetches), "
            f"{stats.pages_fetched} pages, hits {stats.hits}, misses {stats.misses}, "
            f"evictions {stats.evictions}, {seconds * 1e3:.1f} ms"
        )
    with_prefetch = results["prefetch 32 MiB"][-1][0].crossings
    without = results["no prefetch 32 MiB"][0][0].crossings  # nothing learned yet
    assert with_prefetch < n / 4
    assert results["prefetch 1 MiB"][-1][0].crossings < n / 4
    assert without >= n  # at least one crossing per task without the hint
