"""What ``sgmonitor bench`` compares each run's list with (no guest needed)."""

from __future__ import annotations

import pytest

from sgmonitor.bench import ROUNDS, Reference, Run, Scan, rounds

GUEST = [
    {"pid": 1, "ppid": 0, "uid": 0, "state": "S", "comm": "init"},
    {"pid": 2, "ppid": 0, "uid": 0, "state": "S", "comm": "kthreadd"},
    {"pid": 7, "ppid": 2, "uid": 0, "state": "I", "comm": "kworker/0:1-events"},
    {"pid": 9, "ppid": 1, "uid": 1000, "state": "S", "comm": "sleep"},
]


def scanned(**changes: object) -> list[dict[str, object]]:
    records: list[dict[str, object]] = []
    for p in GUEST:
        comm = str(p["comm"]).split("-")[0]
        records.append({**p, "tgid": p["pid"], "comm": comm, "name": comm})
    for pid, change in changes.items():
        record = next(r for r in records if r["pid"] == int(pid.removeprefix("pid")))
        record.update(change)  # type: ignore[call-overload]
    return records


def test_a_scan_that_agrees_with_the_guest() -> None:
    truth = Reference("guest", GUEST, helper_pid=42)
    assert truth.differences(scanned()) == []
    helper = {"pid": 42, "tgid": 42, "ppid": 1, "uid": 0, "state": "Z", "comm": "sh", "name": "sh"}
    assert truth.differences([*scanned(), helper]) == []  # the listing's printer, exiting
    assert truth.differences(scanned(pid7={"state": "R"})) == []  # a kernel thread woke


def test_every_other_difference_is_reported() -> None:
    truth = Reference("guest", GUEST)
    assert truth.differences(scanned()[:-1]) == ["pid 9: not found by the scan"]
    extra = {"pid": 5, "tgid": 5, "ppid": 1, "uid": 0, "state": "S", "comm": "x", "name": "x"}
    assert truth.differences([*scanned(), extra]) == ["pid 5: not listed by the guest"]
    for change in ({"uid": 0}, {"ppid": 2}, {"name": "slept"}, {"tgid": 1}, {"state": "R"}):
        assert [d.split(":")[0] for d in truth.differences(scanned(pid9=change))] == ["pid 9"]


def test_against_a_traditional_scan_nothing_may_differ() -> None:
    first = scanned()
    truth = Reference("traditional", first)
    assert truth.differences(scanned()) == []
    assert truth.differences(scanned(pid7={"state": "R"})) != []
    assert truth.differences(list(reversed(first))) == ["the same records in another order"]


def test_runs_are_spread_over_rounds_as_evenly_as_may_be() -> None:
    for runs in range(1, 4 * ROUNDS + 3):
        shares = rounds(runs)
        assert sum(shares) == runs and len(shares) == min(runs, ROUNDS)
        assert max(shares) - min(shares) <= 1 and min(shares) >= 1
    assert rounds(10) == [2] * ROUNDS
    assert rounds(2) == [1, 1]


def _part(mode: str, times: list[float], mismatch: str = "") -> Run:
    scans = tuple(Scan(t, t / 4, not mismatch) for t in times)
    return Run(
        mode=mode,
        processes=210,
        cache_budget=32 << 20,
        runs=len(times),
        mean_s=sum(times) / len(times),
        stdev_s=0.0,
        min_s=min(times),
        crossing_mean_s=sum(times) / len(times) / 4,
        crossings=3,
        pages_fetched=248,
        truth="guest",
        records_match_truth=not mismatch,
        mismatch=mismatch,
        scans=scans,
    )


def test_runs_of_one_mode_measured_in_rounds_join_into_one() -> None:
    joined = Run.joined([_part("secure", [0.004, 0.006]), _part("secure", [0.008])])
    assert joined.runs == 3 and [s.elapsed_s for s in joined.scans] == [0.004, 0.006, 0.008]
    assert joined.mean_s == pytest.approx(0.006) and joined.min_s == 0.004
    assert joined.stdev_s == pytest.approx(0.002)
    assert joined.crossing_mean_s == pytest.approx(0.0015)
    assert joined.records_match_truth and joined.mismatch == ""
    wrong = Run.joined([_part("secure", [0.004]), _part("secure", [0.005], "pid 9: not found")])
    assert not wrong.records_match_truth and wrong.mismatch == "pid 9: not found"
    with pytest.raises(ValueError):
        Run.joined([_part("secure", [0.004]), _part("traditional", [0.003])])
    with pytest.raises(ValueError):
        Run.joined([])
