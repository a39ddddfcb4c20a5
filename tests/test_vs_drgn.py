"""benchmarks/vs_drgn.py's pure parts: timings, pid-set check, goals, table and JSON.

Nothing here downloads drgn or the -dbg package, or boots a guest.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from sgmonitor.bench import Run

MIB = 1 << 20


@pytest.fixture(scope="module")
def vs() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_drgn.py"
    spec = importlib.util.spec_from_file_location("vs_drgn", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_drgn"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(mode: str, budget: int | None, mean_s: float, ok: bool = True) -> Run:
    return Run(
        mode=mode,
        processes=1000,
        cache_budget=budget,
        runs=3,
        mean_s=mean_s,
        stdev_s=0.001,
        min_s=mean_s,
        crossing_mean_s=0.0,
        crossings=0,
        pages_fetched=0,
        truth="guest",
        records_match_truth=ok,
        mismatch="" if ok else "pid 7: not found by the scan",
    )


def _row(vs: ModuleType, requested: int = 1000, secure_ok: bool = True) -> object:
    timing = vs.Timing.of
    return vs.Row(
        requested=requested,
        processes=1000,
        drgn_warm=timing([0.100, 0.100, 0.100], 1000, [""]),
        drgn_cold=timing([1.0, 1.2], 1000, ["", ""]),
        sgmonitor_cold=timing([0.8, 0.8], 1000, ["", ""]),
        sgmonitor=(
            _run("traditional", None, 0.050),
            _run("secure", 32 * MIB, 0.080, secure_ok),
            _run("secure", 1 * MIB, 0.070),
        ),
    )


def test_timing_of_runs(vs: ModuleType) -> None:
    t = vs.Timing.of([0.1, 0.3], 5, ["", "pid 3: missing"])
    assert t.runs == 2 and t.tasks == 5
    assert t.mean_s == pytest.approx(0.2) and t.min_s == pytest.approx(0.1)
    assert t.stdev_s == pytest.approx(0.1414, abs=1e-4)
    assert not t.matches_truth and t.mismatch == "pid 3: missing"
    assert vs.Timing.of([0.5], 1, [""]).stdev_s == 0.0


def test_timings_of_rounds_join_into_one(vs: ModuleType) -> None:
    rounds = [vs.Timing.of([0.1, 0.3], 5, ["", ""]), vs.Timing.of([0.2], 6, ["pid 3: missing"])]
    t = vs.Timing.joined(rounds)
    assert t.times_s == (0.1, 0.3, 0.2) and t.runs == 3 and t.tasks == 6
    assert t.mean_s == pytest.approx(0.2) and t.min_s == pytest.approx(0.1)
    assert not t.matches_truth and t.mismatch == "pid 3: missing"
    assert vs.Timing.joined(rounds[:1]).matches_truth


def test_pid_set_difference(vs: ModuleType) -> None:
    assert vs.pid_set_difference([1, 2, 3], [3, 2, 1], helper_pid=0) == ""
    # the process that printed the guest's listing may be there or gone
    assert vs.pid_set_difference([1, 2], [1, 2, 99], helper_pid=99) == ""
    assert vs.pid_set_difference([1, 2, 99], [1, 2], helper_pid=99) == ""
    found = vs.pid_set_difference([1, 4], [1, 2], helper_pid=0)
    assert "[4]" in found and "[2]" in found
    assert vs.pid_set_difference([1, 1, 2], [1, 2], helper_pid=0) == "a pid listed twice"


def test_goals_ratios_and_verdicts(vs: ModuleType) -> None:
    by_name = {g.name: g for g in vs.goals(_row(vs))}
    assert by_name["secure / drgn warm"].ratio == pytest.approx(0.8)
    assert not by_name["secure / drgn warm"].met
    assert by_name["secure / drgn warm"].verdict() == "missed by 1.60x (+0.30)"
    assert by_name["secure / traditional"].ratio == pytest.approx(1.6)
    assert by_name["secure 1 MiB / traditional"].ratio == pytest.approx(1.4)
    assert by_name["secure 1 MiB / traditional"].verdict() == "met"
    assert by_name["cold traditional / drgn cold"].ratio == pytest.approx(0.8 / 1.1)
    assert by_name["cold traditional / drgn cold"].met
    # the 1 MiB goal is set at ~1,000 processes only
    small = {g.name for g in vs.goals(_row(vs, requested=200))}
    assert "secure 1 MiB / traditional" not in small and len(small) == 3


def test_table_marks_goals_and_wrong_lists(vs: ModuleType) -> None:
    text = vs.table([_row(vs, secure_ok=False)])
    lines = text.splitlines()
    assert lines[0].startswith("| processes | drgn warm (ms) | traditional (ms)")
    assert "| 1000 | 100.0 ± 0.0 | 50.0 ± 1.0 | 80.0 ± 1.0 (WRONG LIST) | 70.0 ± 1.0 |" in text
    assert "| 1000 | secure / traditional | 1.60 | ≤ 1.3 | missed by 1.23x (+0.30) |" in text
    assert "| 1000 | cold traditional / drgn cold | 0.73 | ≤ 1.0 | met |" in text


def test_document_is_json(vs: ModuleType) -> None:
    doc = vs.document([_row(vs)], {"commit": "abc1234", "runs": 3})
    again = json.loads(json.dumps(doc))
    assert again["commit"] == "abc1234"
    assert again["all_lists_match_guest"] is True
    assert again["all_goals_met"] is False
    result = again["results"][0]
    assert result["drgn_warm"]["mean_s"] == pytest.approx(0.1)
    assert [r["mode"] for r in result["sgmonitor_warm"]] == ["traditional", "secure", "secure"]
    assert {g["name"] for g in again["goals"] if g["met"]} == {
        "secure 1 MiB / traditional",
        "cold traditional / drgn cold",
    }
    wrong = vs.document([_row(vs, secure_ok=False)], {})
    assert wrong["all_lists_match_guest"] is False
