"""``sgmonitor demo``: the whole system, every party its own process, in one command.

1. a guest: the built-in lab guest (booted here, stopped at the end) or ``--qemu SOCK``;
2. a local deployment (``sgmonitor.local``): the hypervisor service, an attestation
   service whose policy pins the installed enclave, and the remote monitor, with
   throw-away keys each service makes itself;
3. ``sgmonitor ids run``: the untrusted library and the measured enclave, which register
   their keys through attestation and scan on a schedule;
4. the guest's processes as the monitor opened them from the first sealed report;
5. heartbeats answered for a few intervals (the monitor's own counters);
6. an attack on the lab guest (DKOM from outside: a process unlinked from the task list
   in guest RAM, as a rootkit's ``list_del`` does), the monitor's alert naming it and
   the time it took, then the guest restored (a guest of yours, ``--qemu``, is not
   attacked);
7. the IDS stopped with SIGSTOP, and the time the monitor took to declare it failed;
8. everything stopped.

Progress goes to stderr, one line per step; ``--json`` prints one document on stdout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from sgmonitor.attestation.policy import Policy
from sgmonitor.errors import SGMonitorError
from sgmonitor.lab import attacks
from sgmonitor.local import LocalDeployment, local_deployment, read_json_lines, running_ids

__all__ = ["run_demo"]

IDS = "demo-ids"


@contextlib.contextmanager
def _guest(qmp: str | None, say: Callable[[str], None]) -> Iterator[tuple[str, str | None]]:
    """(QMP socket, the RAM file to attack: the lab guest's only)."""
    if qmp is not None:
        yield qmp, None
        return
    from sgmonitor.lab import machine
    from sgmonitor.lab.initramfs import Workload

    name = f"demo{os.getpid()}"
    say("booting the lab guest (a Debian kernel under QEMU, ~250 processes)")
    guest = machine.start(name, machine.MachineConfig(workload=Workload(procs=200)))
    try:
        yield guest.qmp, guest.ram
    finally:
        say("stopping the lab guest")
        machine.stop(name)


def _alerts(local: LocalDeployment) -> list[dict[str, Any]]:
    return read_json_lines(local.alerts)


def _wait(what: str, timeout: float, found: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.05)
    raise SGMonitorError(f"demo: {what} did not happen within {timeout:.0f}s")


def _counter(metrics: str, name: str, labels: str) -> float:
    """One sample of the monitor's Prometheus exposition."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    prefix = f"{name}{{{labels}}} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def _attack(
    local: LocalDeployment,
    ram: str | None,
    victim: int,
    patches: list[attacks.Patch],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Hide a process in guest RAM while the IDS runs; the monitor's finding alert."""
    if ram is None:
        say("attack step skipped: the demo attacks only its own lab guest, not yours")
        return {"performed": False, "why": "not the demo's own lab guest"}
    say(f"attack: unlinking pid {victim} (sleep) from the task list in guest RAM")
    started = time.time()
    attacks.apply(ram, patches)
    try:
        alert = _wait(
            "the monitor's finding",
            120.0,
            lambda: next(
                (
                    a
                    for a in _alerts(local)
                    if a.get("kind") == "finding" and a.get("pid") == victim
                ),
                None,
            ),
        )
    finally:
        attacks.undo(ram, patches)
    detected = float(alert["time"]) - started
    say(f"the monitor alerted after {detected:.2f}s: {alert['summary']}; guest restored")
    return {
        "performed": True,
        "what": "a process unlinked from the task list in guest RAM (DKOM)",
        "pid": victim,
        "alert": alert,
        "detected_after_s": round(detected, 3),
    }


def run_demo(
    qmp: str | None,
    *,
    interval: float,
    say: Callable[[str], None],
    policy: Policy | None = None,
) -> dict[str, Any]:
    """Run the demo (see the module docstring); the JSON document."""
    with _guest(qmp, say) as (qmp_socket, ram):
        victim, patches = attacks.hide_process(qmp_socket, "sleep") if ram else (0, [])
        say("starting the hypervisor service, the attestation service and the remote monitor")
        with local_deployment(
            {"guest": qmp_socket}, heartbeat_interval=interval, metrics=True, say=say, policy=policy
        ) as local:
            say("starting the IDS: it registers its keys through attestation, then scans")
            checks = ("pslist", "all")
            with running_ids(local, IDS, interval=max(2.0, 4 * interval), checks=checks) as ids:
                report = local.opened_report(IDS, 0, timeout=120.0)
                records = report["records"]
                say(f"the monitor opened report 0: {len(records)} processes")
                stats = report["stats"]
                _wait(
                    "the first heartbeat",
                    30.0,
                    lambda: any(a.get("to") == "ok" for a in _alerts(local) if a.get("ids") == IDS),
                )
                time.sleep(4 * interval)
                labels = f'ids="{IDS}"'
                sent = _counter(local.metrics, "sgmonitor_challenges_total", labels)
                answered = _counter(
                    local.metrics, "sgmonitor_heartbeats_total", f'{labels},result="answered"'
                )
                say(f"heartbeats every {interval:g}s: {answered:.0f} of {sent:.0f} answered")
                attack = _attack(local, ram, victim, patches, say)
                say("stopping the IDS with SIGSTOP")
                stopped = time.time()
                os.kill(ids.pid, signal.SIGSTOP)
                failed = _wait(
                    "the failure alert",
                    30 * interval + 10,
                    lambda: next(
                        (
                            a
                            for a in _alerts(local)
                            if a.get("ids") == IDS
                            and a.get("to") == "failed"
                            and float(a["time"]) >= stopped
                        ),
                        None,
                    ),
                )
                detected = float(failed["time"]) - stopped
                say(f"the monitor declared the IDS failed after {detected:.2f}s")
            alerts = [a for a in _alerts(local) if a.get("kind") in ("state", "report", "finding")]
        say("stopped every service")
    return {
        "processes": [{k: r[k] for k in ("pid", "ppid", "uid", "comm")} for r in records],
        "transport": {
            "pages_sealed": stats.get("pages_fetched"),
            "crossings": stats.get("crossings"),
            "cache_hits": stats.get("hits"),
            "cache_misses": stats.get("misses"),
            "bytes_decrypted": stats.get("bytes_decrypted"),
        },
        "heartbeat": {"interval_s": interval, "sent": int(sent), "answered": int(answered)},
        "alerts": alerts,
        "attack": attack,
        "failure_detected_after_s": round(detected, 3),
    }


def print_table(doc: dict[str, Any], out: Any = sys.stdout) -> None:
    """The demo's result for a person."""
    print(f"{'PID':>7} {'PPID':>7} {'UID':>6} COMM", file=out)
    for p in doc["processes"]:
        print(f"{p['pid']:>7} {p['ppid']:>7} {p['uid']:>6} {p['comm']}", file=out)
    t, h = doc["transport"], doc["heartbeat"]
    print(
        f"\n{len(doc['processes'])} processes, as the remote monitor opened them; "
        f"{t['pages_sealed']} pages sealed, {t['crossings']} crossings, "
        f"cache {t['cache_hits']} hits / {t['cache_misses']} misses",
        file=out,
    )
    print(
        f"heartbeats every {h['interval_s']:g}s: {h['answered']} of {h['sent']} answered", file=out
    )
    attack = doc["attack"]
    if attack["performed"]:
        print(
            f"attack: {attack['what']} (pid {attack['pid']}): the monitor alerted after "
            f"{attack['detected_after_s']:.2f}s: {attack['alert']['summary']}",
            file=out,
        )
    else:
        print(f"attack: not performed ({attack['why']})", file=out)
    print(f"alerts: {len(doc['alerts'])}", file=out)
    print(f"IDS stopped -> declared failed after {doc['failure_detected_after_s']:.2f}s", file=out)
