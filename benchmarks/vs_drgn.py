"""SGmonitor against drgn, on the same lab guest in the same run (issue 10, item 1).

    .venv/bin/python benchmarks/vs_drgn.py [--processes 200 1000] [--runs 10]
        [--json] [--save-json FILE]

Downloads, once, into the cache (``$SGMONITOR_CACHE``, default ~/.cache/sgmonitor):
- drgn ``DRGN_VERSION`` from PyPI, in a virtual environment of its own (``drgn/venv-X``);
- Debian's ``linux-image-<release>-dbg`` for the lab kernel: only its vmlinux with DWARF
  is kept (``dbg/<release>/usr/lib/debug/boot/vmlinux-<release>``, ~840 MB unpacked;
  the 283 MB package is removed once unpacked).
A re-run downloads nothing.

For each process count it boots a lab guest (cloud kernel, 5-level paging, KASLR; QEMU
under TCG), takes the guest's own /proc listing, then holds the guest stopped and
measures in up to five rounds (:func:`sgmonitor.bench.rounds`; 10 runs: five rounds of
two), each round taking its share of the runs of every kind below, in this order, so
that a slow stretch of the machine falls on every kind rather than on one:
- drgn warm: one ``drgn --qemu QMP -s VMLINUX -q SCRIPT`` process a round; SCRIPT scans
  once untimed, then times the round's scans of ``for_each_task`` reading each task's
  pid and comm (``time.perf_counter`` inside the drgn process: debug info loaded, types
  known);
- drgn cold: one-shots of the same command scanning once (process start, QMP set-up,
  DWARF index of the vmlinux, scan, JSON output, exit), wall time from here;
- SGmonitor cold: one-shots of ``sgmonitor ps --mode traditional --qemu QMP --json``
  (process start, QMP, vmcoreinfo scan, kallsyms, BTF, scan, output), wall time.
  The package's bytecode is compiled first, as pip compiles drgn's at install: an
  editable checkout run with PYTHONDONTWRITEBYTECODE set (as on this project's machines)
  would otherwise compile every module again in every one-shot (~60 ms);
- SGmonitor warm: :func:`sgmonitor.bench.measure_guest` with the modes traditional and
  secure at 32 MiB and 1 MiB cache budgets (``sgmonitor bench``'s own timing: each mode
  scans once untimed, then the modes take turns, each scan from an empty translation
  and enclave cache), with a local deployment of its own each round.
Each kind's runs of all rounds make its figures (``--runs`` in all).

How drgn reads the guest: drgn's ``--qemu`` (drgn >= 0.3.0) asks QEMU over QMP for its
memory map (``info mtree -f``) and each RAM region's host address (``gpa2hva``), takes
the ELF notes (vmcoreinfo, registers) from a one-byte ``dump-guest-memory`` into a memfd,
and then reads guest RAM from the QEMU process with ``process_vm_readv``. Like
SGmonitor's traditional mode, it reads the live RAM of the same stopped guest from the
host with no help from the guest; unlike it, it needs the 283 MB -dbg package (SGmonitor
takes symbols and types from the guest's kallsyms and BTF) and it reads only pid and comm
per task, where every SGmonitor mode reads pid, tgid, ppid, uid, state, comm and name.
The issue's goals count those against drgn's scan as they are.

Checks: every SGmonitor run (warm runs of every mode, and each cold run's output) is
compared with the guest's own listing as ``sgmonitor bench`` does
(:meth:`sgmonitor.bench.Reference.differences`); every drgn scan's pid set (warm and
cold) must equal the guest's (the process that printed the listing may be missing).
The script exits 1 if any run of either tool differs from the guest.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

from sgmonitor.bench import Reference, Run, breakdown, measure_guest, rounds
from sgmonitor.guest.qmp import held_still
from sgmonitor.lab import machine
from sgmonitor.lab.initramfs import Workload
from sgmonitor.lab.kernel import cache_dir, fetch_kernel

DRGN_VERSION = "0.3.0"
MIB = 1 << 20
BUDGETS = (32 * MIB, 1 * MIB)
# Kernel threads and /init's own processes on a lab guest (as sgmonitor bench counts).
BASE_PROCESSES = 46
REPO = Path(__file__).resolve().parent.parent

# Run by drgn's own interpreter (``prog`` is drgn's global): argv[1] timed scans after
# one untimed scan, or, with 0, one scan alone. Prints the times and the last scan.
DRGN_SCAN = """\
import json, sys, time
from drgn.helpers.linux.pid import for_each_task

def scan():
    return [[t.pid.value_(), t.comm.string_().decode(errors="replace")]
            for t in for_each_task(prog)]

runs = int(sys.argv[1])
times = []
tasks = scan()
for _ in range(runs):
    start = time.perf_counter()
    tasks = scan()
    times.append(time.perf_counter() - start)
json.dump({"times": times, "tasks": tasks}, sys.stdout)
"""


# --- the pure parts: timings, the comparison, goals, table and JSON -----------------


@dataclass(frozen=True)
class Timing:
    """One tool's runs of one kind (warm or cold) on one guest."""

    runs: int
    mean_s: float
    stdev_s: float
    min_s: float
    times_s: tuple[float, ...]
    tasks: int  # processes the last run listed
    matches_truth: bool  # every run
    mismatch: str = ""  # the first difference found

    @classmethod
    def of(cls, times: Sequence[float], tasks: int, mismatches: Sequence[str]) -> Timing:
        return cls(
            runs=len(times),
            mean_s=statistics.mean(times),
            stdev_s=statistics.stdev(times) if len(times) > 1 else 0.0,
            min_s=min(times),
            times_s=tuple(times),
            tasks=tasks,
            matches_truth=not any(mismatches),
            mismatch=next((m for m in mismatches if m), ""),
        )

    @classmethod
    def joined(cls, parts: Sequence[Timing]) -> Timing:
        """The runs of several rounds as one timing (tasks: the last round's)."""
        times = [t for part in parts for t in part.times_s]
        return cls.of(times, parts[-1].tasks, [part.mismatch for part in parts])


def pid_set_difference(pids: Sequence[int], truth: Sequence[int], helper_pid: int) -> str:
    """What differs between a drgn scan's pids and the guest's own; "" when they agree.
    The process that printed the guest's listing may still be there or gone."""
    ours, theirs = set(pids) - {helper_pid}, set(truth) - {helper_pid}
    if len(pids) != len(set(pids)):
        return "a pid listed twice"
    extra, missing = sorted(ours - theirs), sorted(theirs - ours)
    if not extra and not missing:
        return ""
    return f"not listed by the guest: {extra[:10]}; not found by the scan: {missing[:10]}"


@dataclass(frozen=True)
class Goal:
    """One of issue 10's goals at one process count."""

    processes: int
    name: str
    ratio: float
    limit: float

    @property
    def met(self) -> bool:
        return self.ratio <= self.limit

    def verdict(self) -> str:
        if self.met:
            return "met"
        return f"missed by {self.ratio / self.limit:.2f}x ({self.ratio - self.limit:+.2f})"

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "met": self.met}


@dataclass(frozen=True)
class Row:
    """Every figure at one guest size."""

    requested: int  # --processes
    processes: int  # the guest's own listing
    drgn_warm: Timing
    drgn_cold: Timing
    sgmonitor_cold: Timing
    sgmonitor: tuple[Run, ...] = field(default=())  # traditional, secure 32 MiB, secure 1 MiB

    def warm(self, mode: str, budget: int | None = None) -> Run | None:
        return next(
            (r for r in self.sgmonitor if r.mode == mode and r.cache_budget == budget), None
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "requested": self.requested,
            "processes": self.processes,
            "drgn_warm": asdict(self.drgn_warm),
            "drgn_cold": asdict(self.drgn_cold),
            "sgmonitor_cold_traditional": asdict(self.sgmonitor_cold),
            "sgmonitor_warm": [r.as_dict() for r in self.sgmonitor],
        }

    def all_match(self) -> bool:
        timings = (self.drgn_warm, self.drgn_cold, self.sgmonitor_cold)
        return all(t.matches_truth for t in timings) and all(
            r.records_match_truth for r in self.sgmonitor
        )


def goals(row: Row) -> list[Goal]:
    """Issue 10's goals that apply at this size, each a ratio of means. The 1 MiB goal
    is set at ~1,000 processes (applied from 900 up)."""
    out: list[Goal] = []
    traditional = row.warm("traditional")
    secure = row.warm("secure", 32 * MIB)
    small = row.warm("secure", 1 * MIB)
    n = row.processes
    if secure is not None:
        out.append(Goal(n, "secure / drgn warm", secure.mean_s / row.drgn_warm.mean_s, 0.5))
    if secure is not None and traditional is not None:
        out.append(Goal(n, "secure / traditional", secure.mean_s / traditional.mean_s, 1.3))
    if small is not None and traditional is not None and row.requested >= 900:
        out.append(Goal(n, "secure 1 MiB / traditional", small.mean_s / traditional.mean_s, 1.5))
    out.append(
        Goal(
            n,
            "cold traditional / drgn cold",
            row.sgmonitor_cold.mean_s / row.drgn_cold.mean_s,
            1.0,
        )
    )
    return out


def _ms(run: Run | Timing | None) -> str:
    if run is None:
        return "-"
    ok = run.records_match_truth if isinstance(run, Run) else run.matches_truth
    return f"{run.mean_s * 1e3:.1f} ± {run.stdev_s * 1e3:.1f}" + ("" if ok else " (WRONG LIST)")


def table(rows: Sequence[Row]) -> str:
    """The side-by-side table (means ± stdev), then each goal met or missed."""
    lines = [
        "| processes | drgn warm (ms) | traditional (ms) | secure 32 MiB (ms) "
        "| secure 1 MiB (ms) | drgn cold (ms) | cold traditional (ms) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.processes} | {_ms(row.drgn_warm)} | {_ms(row.warm('traditional'))} "
            f"| {_ms(row.warm('secure', 32 * MIB))} | {_ms(row.warm('secure', 1 * MIB))} "
            f"| {_ms(row.drgn_cold)} | {_ms(row.sgmonitor_cold)} |"
        )
    lines += [
        "",
        "| processes | goal | ratio | limit | verdict |",
        "| ---: | --- | ---: | ---: | --- |",
    ]
    for row in rows:
        for goal in goals(row):
            lines.append(
                f"| {goal.processes} | {goal.name} | {goal.ratio:.2f} | "
                f"≤ {goal.limit:.1f} | {goal.verdict()} |"
            )
    return "\n".join(lines)


def document(rows: Sequence[Row], setup: dict[str, object]) -> dict[str, object]:
    """The whole run as one JSON document."""
    every = [g for row in rows for g in goals(row)]
    return {
        **setup,
        "results": [row.as_dict() for row in rows],
        "goals": [g.as_dict() for g in every],
        "all_goals_met": all(g.met for g in every),
        "all_lists_match_guest": all(row.all_match() for row in rows),
    }


# --- downloads (cached) ---------------------------------------------------------------


def ensure_drgn(say: Callable[[str], None]) -> Path:
    """drgn ``DRGN_VERSION`` in a venv of its own under the cache; its ``drgn`` script."""
    venv = cache_dir() / "drgn" / f"venv-{DRGN_VERSION}"
    drgn = venv / "bin" / "drgn"
    if drgn.exists():
        return drgn
    say(f"installing drgn {DRGN_VERSION} from PyPI into {venv}")
    # Installers' chatter goes to stderr: stdout is the table or the JSON.
    subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(venv)], stdout=sys.stderr, check=True
    )
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", f"drgn=={DRGN_VERSION}"],
        stdout=sys.stderr,
        check=True,
    )
    return drgn


def ensure_debug_vmlinux(release: str, say: Callable[[str], None]) -> Path:
    """The vmlinux with DWARF from Debian's ``linux-image-<release>-dbg`` (only that file
    is unpacked; the package is removed afterwards)."""
    root = cache_dir() / "dbg" / release
    member = f"usr/lib/debug/boot/vmlinux-{release}"
    vmlinux = root / member
    if vmlinux.exists():
        return vmlinux
    root.mkdir(parents=True, exist_ok=True)
    package = f"linux-image-{release}-dbg"
    say(f"downloading {package} (~300 MB) into {root}")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run(["apt-get", "download", package], cwd=tmp, stdout=sys.stderr, check=True)
        (deb,) = Path(tmp).glob("*.deb")
        unpacked = Path(tmp) / "x"
        unpacked.mkdir()
        # dpkg-deb -x would unpack every module's debug info too (GBs); take one file.
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        subprocess.run(
            ["tar", "-x", "-C", str(unpacked), f"./{member}"], stdin=tar.stdout, check=True
        )
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0:
            raise RuntimeError(f"dpkg-deb could not read {deb}")
        vmlinux.parent.mkdir(parents=True, exist_ok=True)
        (unpacked / member).rename(vmlinux)
    return vmlinux


# --- measuring ------------------------------------------------------------------------


class DrgnOutput(TypedDict):
    """What ``DRGN_SCAN`` prints: the timed scans' times and the last scan's tasks."""

    times: list[float]
    tasks: list[tuple[int, str]]


def _drgn(drgn: Path, vmlinux: Path, script: Path, qmp: str, runs: int) -> DrgnOutput:
    proc = subprocess.run(
        [str(drgn), "--qemu", qmp, "-s", str(vmlinux), "-q", str(script), str(runs)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"drgn failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    out: DrgnOutput = json.loads(proc.stdout)
    return out


def drgn_runs(
    drgn: Path, vmlinux: Path, script: Path, qmp: str, runs: int, reference: Reference
) -> tuple[Timing, Timing]:
    """drgn warm (one process, ``runs`` timed scans) and cold (``runs`` one-shots)."""
    truth = [int(str(p["pid"])) for p in reference.processes]

    def check(tasks: list[tuple[int, str]]) -> str:
        return pid_set_difference([pid for pid, _ in tasks], truth, reference.helper_pid)

    warm = _drgn(drgn, vmlinux, script, qmp, runs)
    warm_timing = Timing.of(warm["times"], len(warm["tasks"]), [check(warm["tasks"])])
    times, mismatches, tasks = [], [], 0
    for _ in range(runs):
        start = time.perf_counter()
        cold = _drgn(drgn, vmlinux, script, qmp, 0)
        times.append(time.perf_counter() - start)
        mismatches.append(check(cold["tasks"]))
        tasks = len(cold["tasks"])
    return warm_timing, Timing.of(times, tasks, mismatches)


def sgmonitor_cold_runs(qmp: str, runs: int, reference: Reference) -> Timing:
    """``sgmonitor ps --mode traditional --qemu QMP --json`` one-shots, each checked."""
    argv = [sys.executable, "-m", "sgmonitor", "ps", "--mode", "traditional", "--qemu", qmp]
    times, mismatches, tasks = [], [], 0
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([*argv, "--json"], capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"sgmonitor ps failed ({proc.returncode}): {proc.stderr[-800:]}")
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        tasks = len(records)
        found = reference.differences(records)
        mismatches.append(found[0] if found else "")
    return Timing.of(times, tasks, mismatches)


def measure(
    count: int,
    runs: int,
    drgn: Path,
    vmlinux: Path,
    script: Path,
    say: Callable[[str], None],
) -> Row:
    """Boot a guest of ~``count`` processes, measure both tools on it, stop it."""
    name = f"vsdrgn{os.getpid()}-{count}"
    mem = 256 if count <= 1200 else 1024
    say(f"booting lab guest {name} with ~{count} processes")
    guest = machine.start(
        name, machine.MachineConfig(mem_mib=mem, workload=Workload(max(0, count - BASE_PROCESSES)))
    )
    drgn_warm, drgn_cold, cold, warm = [], [], [], []
    try:
        reference = Reference.of_lab_guest(guest)
        with held_still(guest.qmp):
            shares = rounds(runs)
            for number, share in enumerate(shares, 1):
                say(f"round {number} of {len(shares)}: each kind's next {share} of {runs} runs")
                hot, once = drgn_runs(drgn, vmlinux, script, guest.qmp, share, reference)
                drgn_warm.append(hot)
                drgn_cold.append(once)
                cold.append(sgmonitor_cold_runs(guest.qmp, share, reference))
                warm.append(
                    measure_guest(
                        guest.qmp, ["traditional", "secure"], BUDGETS, share, reference=reference
                    )
                )
    finally:
        machine.stop(name)
    return Row(
        count,
        len(reference.processes),
        Timing.joined(drgn_warm),
        Timing.joined(drgn_cold),
        Timing.joined(cold),
        tuple(Run.joined(parts) for parts in zip(*warm, strict=True)),
    )


def _commit() -> str:
    proc = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each kind")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--save-json", metavar="FILE", help="also write the JSON document")
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        print(f"vs_drgn: {text}", file=sys.stderr, flush=True)

    release = fetch_kernel("cloud").release
    compileall.compile_dir(REPO / "sgmonitor", quiet=1)  # see "SGmonitor cold" above
    drgn = ensure_drgn(say)
    vmlinux = ensure_debug_vmlinux(release, say)
    version = subprocess.run(
        [str(drgn), "--version"], capture_output=True, text=True, check=True
    ).stdout.split(" (")[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "drgn_scan.py"
        script.write_text(DRGN_SCAN)
        for count in args.processes:
            rows.append(measure(count, args.runs, drgn, vmlinux, script, say))
    setup: dict[str, object] = {
        "commit": _commit(),
        "command": " ".join(["benchmarks/vs_drgn.py", *(argv or sys.argv[1:])]),
        "kernel_release": release,
        "drgn": version,
        "drgn_method": f"drgn --qemu QMP_SOCKET -s {vmlinux} -q SCRIPT (QMP memory map, "
        "process_vm_readv of QEMU's guest RAM)",
        "runs": args.runs,
    }
    doc = document(rows, setup)
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"commit {setup['commit']}, {version}, kernel {release}, {args.runs} runs each")
        print(table(rows))
        print()
        print("Where each secure scan's time went (measured where it is spent):")
        print(breakdown([run for row in rows for run in row.sgmonitor]))
    return 0 if doc["all_lists_match_guest"] else 1


if __name__ == "__main__":
    sys.exit(main())
