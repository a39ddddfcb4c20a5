"""The remote monitor with a live guest: heartbeats, sealed reports, alerts, taps.

Real processes: the attestation service, the hypervisor service, the monitor, and the
IDS (the library and its measured enclave, in this process or as ``sgmonitor ids run``).
Every claim is checked in the monitor's own alert log, and each attack is really done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from guests import MAIN, GuestUnderTest, only
from prometheus import ALERT_RULES, running_prometheus, wait_for_alert, wait_for_query

from sgmonitor.guest.qemu import QemuGuest
from sgmonitor.ids.pslist import list_processes
from sgmonitor.local import LocalDeployment, local_deployment, read_json_lines, running_ids
from sgmonitor.traditional import open_guest_kernel
from sgmonitor.untrusted.library import SecureMonitor
from sgmonitor.wire.core import decode
from sgmonitor.wire.monitor import HeartbeatAnswer, HeartbeatChallenge

pytestmark = [pytest.mark.guest, only(MAIN)]

INTERVAL = 0.2


@pytest.fixture(scope="module")
def truth(guest: GuestUnderTest) -> dict[str, object]:
    """The in-process view, before any service holds QEMU's QMP: names and addresses
    that must never cross the host in the clear."""
    with QemuGuest(guest.info.qmp) as physical, physical.paused():
        kernel = open_guest_kernel(physical)
        records = [r.as_dict() for r in list_processes(kernel)]
        init_task = kernel.symbols["init_task"]  # type: ignore[index]
    return {"records": records, "init_task": init_task}


@pytest.fixture(scope="module")
def local(guest: GuestUnderTest, truth: dict[str, object]) -> Iterator[LocalDeployment]:
    limits = {"stall_after": 1.5}
    with local_deployment(
        {"main": guest.info.qmp}, heartbeat_interval=INTERVAL, monitor_limits=limits
    ) as deployment:
        yield deployment


def alerts(local: LocalDeployment, ids: str) -> list[dict[str, object]]:
    return [a for a in read_json_lines(local.alerts) if a.get("ids") == ids]


def wait_alert(
    local: LocalDeployment, ids: str, match: Callable[[dict[str, object]], bool], timeout: float
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [a for a in alerts(local, ids) if match(a)]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no such alert for {ids} in {timeout}s: {alerts(local, ids)}")


def state(to: str) -> Callable[[dict[str, object]], bool]:
    return lambda a: a.get("kind") == "state" and a.get("to") == to


def ids_monitor(local: LocalDeployment, ids: str, **kw: object) -> SecureMonitor:
    return SecureMonitor(
        local.hypervisor_socket,
        "main",
        local.verifier,
        local.monitor,
        ids=ids,
        **kw,  # type: ignore[arg-type]
    )


def test_records_arrive_sealed_and_the_monitor_opens_them(
    local: LocalDeployment, guest: GuestUnderTest, truth: dict[str, object]
) -> None:
    """Tap both directions of the enclave link and of the monitor link: no process name
    and no kernel address crosses either in the clear, yet the monitor has them all."""
    seen: dict[str, list[bytes]] = {"enclave": [], "monitor": [], "hypervisor": []}

    def tap(link: str, frame: bytes) -> None:
        seen[link].append(frame)

    with ids_monitor(local, "tapped", tap=tap) as m:
        records, _ = local.records(m)
        time.sleep(3 * INTERVAL)  # heartbeats cross the monitor link too
    assert {p["pid"] for p in guest.truth.processes} <= {r["pid"] for r in records}
    names = sorted({str(r["comm"]) for r in truth["records"] if len(str(r["comm"])) >= 8})  # type: ignore[attr-defined]
    assert "kthreadd" in names
    address = int(truth["init_task"])  # type: ignore[call-overload]
    secrets = [n.encode() for n in names]
    secrets += [address.to_bytes(8, "little"), f"{address:x}".encode(), str(address).encode()]
    for link in ("enclave", "monitor"):
        carried = b"".join(seen[link])
        assert len(carried) > 10_000, link  # the report crossed it
        assert [s for s in secrets if s in carried] == [], link
    kinds = {decode(f).__class__.__name__ for f in seen["monitor"]}
    assert {"SealedReport", "HeartbeatChallenge", "HeartbeatAnswer", "ReportAck"} <= kinds


def test_heartbeats_ok_then_a_frozen_scan_loop_is_stalled(local: LocalDeployment) -> None:
    """The heartbeat thread answers, the scan loop never runs: stalled, not ok."""
    with ids_monitor(local, "frozen") as m:
        local.records(m)  # one scan: progress 1
        wait_alert(local, "frozen", state("ok"), 10 * INTERVAL)
        stalled = wait_alert(local, "frozen", state("stalled"), 5.0)
        assert m.link is not None and m.link.answered > 3
    assert "no scan completed" in str(stalled["details"])


def last_challenge(frames: list[bytes]) -> HeartbeatChallenge:
    found = [decode(f) for f in frames if f[1] == HeartbeatChallenge.TYPE]
    assert found
    return found[-1]  # type: ignore[return-value]


def test_answers_without_the_key_and_replayed_answers_are_invalid(local: LocalDeployment) -> None:
    frames: list[bytes] = []
    with ids_monitor(local, "forged", tap=lambda link, f: frames.append(f)) as m:
        assert m.link is not None
        wait_alert(local, "forged", state("ok"), 10 * INTERVAL)
        # the host answers a challenge itself: it has no heartbeat key
        challenge = last_challenge(frames)
        m.link._send(HeartbeatAnswer(challenge.number, 10**6, 10**6, os.urandom(32)))
        first = wait_alert(local, "forged", state("invalid"), 5.0)
        assert "wrong or replayed" in str(first["details"])
        wait_alert(local, "forged", lambda a: a.get("from") == "invalid", 10 * INTERVAL)
        # a genuine answer, sent again
        genuine = [f for f in frames if f[1] == HeartbeatAnswer.TYPE][-1]
        m.link._send(decode(genuine))
        invalid = [a for a in alerts(local, "forged") if state("invalid")(a)]
        deadline = time.monotonic() + 5.0
        while len(invalid) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            invalid = [a for a in alerts(local, "forged") if state("invalid")(a)]
        assert len(invalid) == 2


def test_reports_edited_dropped_or_replayed_are_detected(local: LocalDeployment) -> None:
    """The relay holds the sealed reports: it edits one, replays one, drops one."""
    with ids_monitor(local, "relay") as m:
        assert m.enclave is not None and m.link is not None

        def sealed_scan() -> tuple[int, bytes]:
            out = m.enclave.ecall(  # type: ignore[union-attr]
                "ecall_run_scan", 60.0, vm="main", check="pslist", options=b"{}"
            )
            return int(out["report_seq"]), bytes(out["report"])  # type: ignore[call-overload, arg-type]

        m.open_session()
        seq, report = sealed_scan()
        m.link.send_report(seq, report[:100] + bytes([report[100] ^ 1]) + report[101:])
        forged = wait_alert(local, "relay", lambda a: a.get("problem") == "forged", 5.0)
        assert forged["kind"] == "report"
        m.link.send_report(seq, report)  # the genuine one still opens
        assert m.link.wait_ack(seq, 10.0)
        m.link.send_report(seq, report)
        wait_alert(local, "relay", lambda a: a.get("problem") == "replayed", 5.0)
        sealed_scan()  # report seq+1: the relay drops it
        later, report = sealed_scan()
        m.link.send_report(later, report)
        dropped = wait_alert(local, "relay", lambda a: a.get("problem") == "dropped", 5.0)
        assert "1 report(s)" in str(dropped["details"])
        assert m.link.wait_ack(later, 10.0)  # the later genuine report is accepted


def test_a_stopped_ids_is_failed_within_three_intervals(local: LocalDeployment) -> None:
    with running_ids(local, "stopped", interval=0.5) as proc:
        wait_alert(local, "stopped", state("ok"), 10.0)
        stopped_at = time.time()
        os.kill(proc.pid, signal.SIGSTOP)
        failed = wait_alert(local, "stopped", state("failed"), 20 * INTERVAL)
        detected = float(failed["time"]) - stopped_at  # type: ignore[arg-type]
        assert detected <= 3 * INTERVAL + INTERVAL + 0.3, detected  # 3 intervals (+ tick)
        assert float(failed["detected_after_s"]) > 3 * INTERVAL  # type: ignore[arg-type]


def test_ids_run_stops_cleanly_on_sigterm(local: LocalDeployment) -> None:
    with running_ids(local, "clean", interval=0.5, stderr=subprocess.PIPE) as proc:
        wait_alert(local, "clean", state("ok"), 10.0)
        local.opened_report("clean", 0)  # its first scan reached the monitor
        proc.terminate()
        assert proc.wait(15.0) == 0
        assert proc.stderr is not None
        assert "report 0 sent" in proc.stderr.read().decode()


def test_prometheus_fires_when_the_ids_is_stopped(guest: GuestUnderTest) -> None:
    """The real Prometheus scrapes the monitor; the IDS stops (SIGSTOP); the shipped
    rule's alert reaches state firing in Prometheus's own API, for that IDS."""
    with local_deployment(
        {"main": guest.info.qmp}, heartbeat_interval=INTERVAL, metrics=True
    ) as own:
        assert own.metrics
        with (
            running_prometheus([own.metrics], ALERT_RULES) as prometheus,
            running_ids(own, "scraped", interval=0.5) as proc,
        ):
            wait_alert(own, "scraped", state("ok"), 10.0)
            wait_for_query(prometheus, 'sgmonitor_ids_state{ids="scraped",state="ok"} == 1')
            os.kill(proc.pid, signal.SIGSTOP)
            firing = wait_for_alert(prometheus, "SGMonitorIDSFailed", {"ids": "scraped"})
            assert firing["state"] == "firing"


def test_a_killed_ids_is_failed_at_once(local: LocalDeployment) -> None:
    """Killed outright, the IDS's connection closes: the monitor says failed at once,
    not silence."""
    with running_ids(local, "killed", interval=0.5) as proc:
        wait_alert(local, "killed", state("ok"), 10.0)
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        failed = wait_alert(local, "killed", state("failed"), 10.0)
        assert "the link closed" in str(failed["details"])
        assert float(failed["time"]) - killed_at < 2 * INTERVAL + 0.5  # type: ignore[arg-type]
