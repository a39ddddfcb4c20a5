"""How many IDS endpoints one remote monitor keeps at a 1 s heartbeat, on one core.

    .venv/bin/python benchmarks/monitor_fleet.py [--endpoints 250 500 1000 1500]
        [--seconds 20] [--scrape-every 10] [--batch 10] [--spread 1.0] [--json]

For each size N it starts the real monitor as its own process (``python -m
sgmonitor.monitor serve --config FILE`` in a temporary directory: interval 1 s,
``failed_after`` 3, ``stall_after`` one day, a policy pinning the identity the
endpoints claim, metrics on ``127.0.0.1:0``), pins it to one core, pins this process to
another, and opens N links over real TCP sockets on loopback, in batches of ``--batch``
(each batch waits for its LinkOpened) paced over at least ``--spread`` seconds, so that,
as in a fleet whose IDS started at different times, the links' heartbeats are spread
over the interval rather than sent in one burst.

Each simulated endpoint does what an enclave and its library do, with real keys and
real MACs: LinkHello; from the LinkChallenge the monitor's nonce and X25519 key; a fresh
link key wrapped for that key (``keywrap``, link id and IDS name as context); the
session binding (purpose MONITOR_LINK), the launch configuration naming the verifier and
this monitor, and a statement over both; LinkOpen; LinkOpened. Then it answers every
HeartbeatChallenge with the HMAC over the challenge, its answer count and its progress
(which counts up every fifth answer). **This benchmark is the verifier**: it makes an
Ed25519 key, gives its public half to the monitor as ``verifier_key``, and signs each
endpoint's statement itself (there is no enclave and no attestation service; the
monitor checks the statement, binding, configuration, policy and wrapped key exactly
as it does for a real one). All endpoints share one selector loop in this process.

After the links are open and have settled (2 s), the window opens when a scrape of the
monitor's metrics returns, lasts ``--seconds``, is scraped every ``--scrape-every``
seconds meanwhile (10 s, as ``deploy/examples/prometheus.yml`` scrapes; 0: not at all)
and closes when a last scrape returns (so a 20 s window holds two scrapes at 10 s, one
at 0). Over it:

- answered: HeartbeatAnswers the endpoints sent in the window (N per second is on time);
- the monitor's verdicts: ``sgmonitor_heartbeats_total`` by result (answered, late,
  missing, invalid) over the window, the state changes the monitor alerted in the
  window (its alert log: to late, failed, stalled, invalid; the goal is none), and the
  IDS states at the end (``sgmonitor_ids_state``);
- monitor RTT: the monitor's ``sgmonitor_heartbeat_rtt_seconds`` histogram (summed over
  every IDS, the difference of the scrapes opening and closing the window; the two
  expositions are made while the monitor runs, so counts are good to a few hundred
  heartbeats at the largest sizes), p50 and p99 estimated from the buckets by linear
  interpolation as Prometheus' ``histogram_quantile`` does, and the largest
  observation's bucket (``max <=``). The monitor takes that time from
  its clock reading at the start of the loop pass that sends the challenge to its clock
  reading when it handles the answer: it includes the monitor's own queueing on both
  sides, the loopback and the endpoint;
- endpoint turnaround: from the moment the endpoints' selector returned with the
  challenge readable to the moment the answer's ``send()`` returned (this includes the
  queueing behind other endpoints woken in the same pass, and the MAC). The endpoints
  cannot see when the monitor sent a challenge, so they measure no round trip;
- challenge spacing: time between two challenges' arrivals on one link (1 s plus the
  monitor's lag; its excess over the interval shows the monitor falling behind);
- challenges per wake-up: how many challenges the endpoints' loop found ready at once
  (the monitor sends the challenges that fall due in one loop pass together);
- CPU: the monitor process's utime + stime (``/proc/PID/stat``, every thread) over the
  window, as a fraction of one core, and its main thread's alone (the selector loop;
  the rest is the metrics endpoint's threads serving the scrapes); the same for this
  process; how busy the whole machine and the monitor's core were (``/proc/stat``), since
  the machine is shared; and how long each scrape took and how big it was.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from sgmonitor.attestation.policy import Policy
from sgmonitor.channel import Suite
from sgmonitor.keywrap import wrap_session_key
from sgmonitor.local import read_json_lines
from sgmonitor.monitorlink import LinkKeys, heartbeat_mac
from sgmonitor.statement import Purpose, SessionBinding, Statement
from sgmonitor.tee.backend import EnclaveIdentity
from sgmonitor.tee.launch_config import LaunchConfig, raw_ed25519
from sgmonitor.wire.core import Error, Message, WireError, decode, framed, pop_frame
from sgmonitor.wire.monitor import (
    HeartbeatAnswer,
    HeartbeatChallenge,
    LinkChallenge,
    LinkHello,
    LinkOpen,
    LinkOpened,
)

INTERVAL = 1.0
SETTLE = 2.0  # seconds between the last link opened and the window
READY_TIMEOUT = 30.0
BATCH_TIMEOUT = 30.0
SCRAPE_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
PROGRESS_EVERY = 5  # answers per scan "completed"
MRENCLAVE = hashlib.sha256(b"sgmonitor benchmark: the simulated enclave").digest()
MRSIGNER = hashlib.sha256(b"sgmonitor benchmark: the simulated signer").digest()
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the monitor process ----------------------------------------------------------------


class Monitor:
    """The real monitor as its own process, in its own directory, pinned to one core."""

    def __init__(self, home: Path, verifier: Ed25519PrivateKey, core: int) -> None:
        home.mkdir(parents=True)
        self.home = home
        policy = Policy(frozenset({MRENCLAVE}), frozenset({MRSIGNER}), min_isv_svn=1)
        (home / "policy.toml").write_text(policy.to_toml())
        verifier_hex = raw_ed25519(verifier.public_key()).hex()
        (home / "monitor.toml").write_text(
            'listen = "127.0.0.1:0"\nkey = "monitor.pem"\npolicy = "policy.toml"\n'
            f'verifier_key = "{verifier_hex}"\nlog = "alerts.jsonl"\n'
            f'metrics = "127.0.0.1:0"\ninterval = {INTERVAL}\n'
            "failed_after = 3\nstall_after = 86400.0\n"
        )
        self.stdout = open(home / "stdout.jsonl", "wb")  # noqa: SIM115 (closed in stop)
        self.stderr = open(home / "stderr.txt", "wb")  # noqa: SIM115
        command = [sys.executable, "-m", "sgmonitor.monitor", "serve", "--exit-with-stdin"]
        self.proc = subprocess.Popen(
            [*command, "--config", str(home / "monitor.toml")],
            cwd=home,
            stdin=subprocess.PIPE,
            stdout=self.stdout,
            stderr=self.stderr,
        )
        self.pid = self.proc.pid
        self.core = core
        try:
            self._pin()
            ready = self._ready()
        except BaseException:
            self.stop()
            raise
        self.address = str(ready["address"])
        self.public_key = bytes.fromhex(str(ready["public_key"]))
        self.metrics = str(ready["metrics"])
        self._pin()  # every thread it has by now (the metrics server's too)

    def _pin(self) -> None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                os.sched_setaffinity(int(tid), {self.core})

    def _ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT
        path = self.home / "stdout.jsonl"
        while time.monotonic() < deadline:
            text = path.read_text()
            if "\n" in text:
                info = json.loads(text.split("\n", 1)[0])
                if isinstance(info, dict) and info.get("ready") is True:
                    return info
                raise RuntimeError(f"monitor: unexpected ready line {text[:200]!r}")
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"monitor exited ({self.proc.returncode}): "
                    + (self.home / "stderr.txt").read_text()[-2000:]
                )
            time.sleep(0.05)
        raise RuntimeError(f"monitor not ready within {READY_TIMEOUT:.0f}s")

    def cpu_seconds(self, *, loop: bool = False) -> float:
        """utime + stime of every thread of the monitor (of its main thread, which runs
        the selector loop, with ``loop``), in seconds."""
        where = f"/proc/{self.pid}/task/{self.pid}" if loop else f"/proc/{self.pid}"
        stat = Path(f"{where}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return math.nan

    def alerts(self) -> list[dict[str, Any]]:
        return read_json_lines(self.home / "alerts.jsonl")

    def stop(self) -> int | None:
        """SIGTERM by PID, then SIGKILL if it does not exit in time. Its exit code."""
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self.stdout.close()
        self.stderr.close()
        return code


# --- the metrics endpoint ---------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Scrape:
    """The monitor's metrics summed over every IDS."""

    seconds: float = 0.0  # how long the scrape took
    size: int = 0  # bytes
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    rtt_count: float = 0.0
    rtt_sum: float = 0.0
    results: dict[str, float] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)  # IDS in each state


def scrape(address: str) -> Scrape:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT) as resp:
        body = resp.read()
    out = Scrape(seconds=time.monotonic() - started, size=len(body))
    for line in body.decode().splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m[3])
        if name == "sgmonitor_heartbeat_rtt_seconds_bucket":
            le = float(labels["le"])
            out.buckets[le] = out.buckets.get(le, 0.0) + value
        elif name == "sgmonitor_heartbeat_rtt_seconds_count":
            out.rtt_count += value
        elif name == "sgmonitor_heartbeat_rtt_seconds_sum":
            out.rtt_sum += value
        elif name == "sgmonitor_heartbeats_total":
            out.results[labels["result"]] = out.results.get(labels["result"], 0.0) + value
        elif name == "sgmonitor_ids_state" and value == 1:
            out.states[labels["state"]] = out.states.get(labels["state"], 0) + 1
    return out


def bucket_quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """``histogram_quantile``: linear interpolation inside the bucket holding rank q."""
    if not cumulative or cumulative[-1][1] <= 0:
        return math.nan
    rank = q * cumulative[-1][1]
    low, below = 0.0, 0.0
    for le, count in cumulative:
        if count >= rank:
            if math.isinf(le):
                return low  # beyond the last finite bound: Prometheus answers that bound
            return low + (le - low) * (rank - below) / (count - below) if count > below else le
        low, below = le, count
    return math.nan


def histogram_window(before: Scrape, after: Scrape) -> dict[str, Any]:
    """The RTT histogram of the window (after - before) and what it says."""
    cumulative = sorted(
        (le, after.buckets.get(le, 0.0) - before.buckets.get(le, 0.0)) for le in after.buckets
    )
    count = after.rtt_count - before.rtt_count
    top = math.nan  # the upper bound of the highest bucket that got an observation
    previous = 0.0
    for le, c in cumulative:
        if c > previous:
            top = le
        previous = c
    return {
        "count": count,
        "mean": (after.rtt_sum - before.rtt_sum) / count if count else math.nan,
        "p50": bucket_quantile(0.5, cumulative),
        "p99": bucket_quantile(0.99, cumulative),
        "max_le": top,
        "buckets": {("+Inf" if math.isinf(le) else f"{le:g}"): c for le, c in cumulative},
    }


# --- the simulated endpoints ------------------------------------------------------------


@dataclass(eq=False)
class Endpoint:
    """One simulated IDS: its socket and, once linked, its link key and counters."""

    name: str
    sock: socket.socket
    phase: str = "hello"  # hello -> open -> linked; or closed
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    link_id: bytes = b""
    link_key: bytes = b""
    keys: LinkKeys | None = None
    seq: int = 0
    progress: int = 0
    last_arrival: float = 0.0
    error: str = ""


class Fleet:
    """Every simulated endpoint of one size, in one selector loop."""

    def __init__(self, monitor: Monitor, verifier: Ed25519PrivateKey) -> None:
        self.monitor = monitor
        self.verifier = verifier
        self.monitor_x25519 = X25519PublicKey.from_public_bytes(monitor.public_key)
        self.config = LaunchConfig("secure", verifier.public_key(), monitor.public_key).to_bytes()
        self.identity = EnclaveIdentity(
            MRENCLAVE, MRSIGNER, 1, 1, False, hashlib.sha256(self.config).digest()
        )
        host, _, port = monitor.address.rpartition(":")
        self.where = (host, int(port))
        self.selector = selectors.DefaultSelector()
        self.endpoints: list[Endpoint] = []
        self.linked = 0
        self.closed = 0
        self.errors: dict[str, int] = {}
        self.measuring = False
        self.answered = 0  # answers sent while measuring
        self.challenges = 0  # challenges received while measuring
        self.turnaround: list[float] = []
        self.spacing: list[float] = []
        self.bursts: list[int] = []  # challenges answered per wake-up of the loop

    def connect(self, names: list[str]) -> list[Endpoint]:
        made = []
        for name in names:
            sock = socket.create_connection(self.where, timeout=5.0)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ep = Endpoint(name, sock)
            self.endpoints.append(ep)
            self.selector.register(sock, selectors.EVENT_READ, ep)
            self._send(ep, LinkHello(name))
            made.append(ep)
        return made

    def pump(self, until: float) -> None:
        """Serve every endpoint until ``until`` (monotonic)."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            events = self.selector.select(timeout=min(left, 0.05))
            woke = time.perf_counter()
            before = self.challenges
            for key, mask in events:
                ep: Endpoint = key.data
                if mask & selectors.EVENT_WRITE:
                    self._flush(ep)
                if mask & selectors.EVENT_READ:
                    self._read(ep, woke)
            if self.challenges > before:
                self.bursts.append(self.challenges - before)

    def _read(self, ep: Endpoint, woke: float) -> None:
        try:
            chunk = ep.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(ep, "closed by the monitor")
            return
        ep.inbox += chunk
        while True:
            try:
                data = pop_frame(ep.inbox)
            except WireError as exc:
                self._close(ep, str(exc))
                return
            if data is None:
                return
            self._handle(ep, decode(data), woke)
            if ep.phase == "closed":
                return

    def _handle(self, ep: Endpoint, msg: Message, woke: float) -> None:
        if isinstance(msg, HeartbeatChallenge) and ep.keys is not None:
            mac = heartbeat_mac(ep.keys, msg.challenge, ep.seq, ep.progress)
            self._send(ep, HeartbeatAnswer(msg.number, ep.seq, ep.progress, mac))
            sent = time.perf_counter()
            ep.seq += 1
            if ep.seq % PROGRESS_EVERY == 0:
                ep.progress += 1
            if self.measuring:
                self.answered += 1
                self.challenges += 1
                self.turnaround.append(sent - woke)
                if ep.last_arrival:
                    self.spacing.append(woke - ep.last_arrival)
            ep.last_arrival = woke
        elif isinstance(msg, LinkChallenge) and ep.phase == "hello":
            self._open(ep, msg)
        elif isinstance(msg, LinkOpened) and ep.phase == "open" and msg.session_id == ep.link_id:
            ep.phase = "linked"
            self.linked += 1
        elif isinstance(msg, Error):
            self._close(ep, f"{msg.code.name}: {msg.message}")
        else:
            self._close(ep, f"unexpected {type(msg).__name__} in phase {ep.phase}")

    def _open(self, ep: Endpoint, msg: LinkChallenge) -> None:
        """What the enclave does (the link key, wrapped for the monitor's key from its
        launch configuration), and what the verifier does (the statement)."""
        ep.link_id, ep.link_key = os.urandom(16), os.urandom(32)
        wrapped = wrap_session_key(
            self.monitor_x25519, ep.link_key, session_id=ep.link_id, vm=ep.name
        )
        binding = SessionBinding.for_wrapped_key(
            ep.name,
            ep.link_id,
            Suite.AES256GCM_HKDF_SHA256,
            wrapped,
            msg.monitor_nonce,
            msg.monitor_key,
            Purpose.MONITOR_LINK,
        )
        now = time.time()
        statement = Statement(self.identity, binding, now, now + 600).sign(self.verifier)
        ep.keys = LinkKeys.derive(ep.link_key, ep.link_id, msg.monitor_nonce)
        ep.phase = "open"
        self._send(ep, LinkOpen(ep.link_id, wrapped, statement, self.config))

    def _send(self, ep: Endpoint, msg: Message) -> None:
        ep.outbox += framed(msg)
        self._flush(ep)

    def _flush(self, ep: Endpoint) -> None:
        try:
            while ep.outbox:
                sent = ep.sock.send(ep.outbox)
                del ep.outbox[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._close(ep, f"send: {exc}")
            return
        with contextlib.suppress(KeyError, ValueError):
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if ep.outbox else 0)
            self.selector.modify(ep.sock, mask, ep)

    def _close(self, ep: Endpoint, why: str) -> None:
        if ep.phase == "closed":
            return
        if ep.phase == "linked":
            self.linked -= 1
        ep.phase, ep.error = "closed", why
        self.closed += 1
        self.errors[why] = self.errors.get(why, 0) + 1
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(ep.sock)
        ep.sock.close()

    def close(self) -> None:
        for ep in self.endpoints:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(ep.sock)
            ep.sock.close()
        self.selector.close()


# --- one size ---------------------------------------------------------------------------


def proc_stat() -> dict[str, tuple[int, int]]:
    """Per CPU line of /proc/stat: (busy ticks, total ticks)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break
        name, *values = line.split()
        ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        total = sum(ticks)
        out[name] = (total - ticks[3] - ticks[4], total)
    return out


def busy_fraction(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], cpu: str
) -> float:
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return busy / total if total else math.nan


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def scrape_while_serving(fleet: Fleet) -> Scrape:
    """Scrape the monitor in a thread while the endpoints keep answering."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(scrape, fleet.monitor.metrics)
        deadline = time.monotonic() + SCRAPE_TIMEOUT + 5
        while not future.done():
            if time.monotonic() > deadline:
                raise RuntimeError("the metrics scrape did not finish")
            fleet.pump(time.monotonic() + 0.05)
        return future.result()


def serve_and_scrape(fleet: Fleet, until: float, every: float) -> list[Scrape]:
    """Serve the endpoints until ``until``, scraping every ``every`` seconds (0: never)
    in a thread; the scrapes that finished."""
    done: list[Scrape] = []
    start = time.monotonic()
    due = [start + k * every for k in range(1, math.ceil((until - start) / every))] if every else []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending: concurrent.futures.Future[Scrape] | None = None
        while time.monotonic() < until or pending is not None:
            if pending is not None and pending.done():
                done.append(pending.result())
                pending = None
            if due and time.monotonic() >= due[0] and pending is None:
                due.pop(0)
                pending = pool.submit(scrape, fleet.monitor.metrics)
            if time.monotonic() > until + SCRAPE_TIMEOUT + 5:
                raise RuntimeError("a metrics scrape did not finish")
            now = time.monotonic()
            fleet.pump(max(now + 0.001, min(now + 0.05, due[0] if due else until)))
    return done


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "max": math.nan}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"n": len(ordered), "p50": rank(0.5), "p99": rank(0.99), "max": ordered[-1]}


def run_size(
    n: int, args: argparse.Namespace, verifier: Ed25519PrivateKey, home: Path, cores: list[int]
) -> dict[str, Any]:
    monitor = Monitor(home / f"n{n}", verifier, cores[0])
    fleet: Fleet | None = None
    try:
        fleet = Fleet(monitor, verifier)
        say(f"[{n}] monitor pid {monitor.pid} on core {cores[0]}, listening {monitor.address}")
        opened_at = time.monotonic()
        for start in range(0, n, args.batch):
            # pace the batches so the links' heartbeat phases spread over --spread seconds
            not_before = opened_at + args.spread * start / n
            fleet.pump(not_before)
            batch = fleet.connect(
                [f"ids-{i:05d}" for i in range(start, min(n, start + args.batch))]
            )
            deadline = time.monotonic() + BATCH_TIMEOUT
            while any(ep.phase in ("hello", "open") for ep in batch):
                if time.monotonic() > deadline:
                    say(f"[{n}] batch at {start} not open within {BATCH_TIMEOUT:.0f}s")
                    break
                fleet.pump(time.monotonic() + 0.01)
        open_seconds = time.monotonic() - opened_at
        say(f"[{n}] {fleet.linked} links open in {open_seconds:.2f}s; settling {SETTLE:.0f}s")
        fleet.pump(time.monotonic() + SETTLE)
        # the window: from the end of one scrape to the end of the last, with scrapes
        # every --scrape-every seconds in between, as Prometheus would scrape
        before = scrape_while_serving(fleet)
        load_before = loadavg()
        stat0, own0 = proc_stat(), os.times()
        cpu0, loop0 = monitor.cpu_seconds(), monitor.cpu_seconds(loop=True)
        wall0, mono0 = time.time(), time.monotonic()
        fleet.measuring = True
        scrapes = serve_and_scrape(fleet, mono0 + args.seconds, args.scrape_every)
        scrapes.append(scrape_while_serving(fleet))
        fleet.measuring = False
        elapsed = time.monotonic() - mono0
        stat1, own1 = proc_stat(), os.times()
        cpu1, loop1 = monitor.cpu_seconds(), monitor.cpu_seconds(loop=True)
        wall1 = time.time()
        load_after = loadavg()
        rss = monitor.rss_mib()
        after = scrapes[-1]
        linked_at_end = fleet.linked
    finally:
        code = monitor.stop()
        if fleet is not None:
            fleet.close()
    alerts = monitor.alerts()
    in_window: dict[str, int] = {}
    after_open: dict[str, int] = {}
    for a in alerts:
        if a.get("kind") != "state":
            continue
        to = str(a["to"])
        after_open[to] = after_open.get(to, 0) + 1
        if wall0 <= float(a["time"]) <= wall1:
            in_window[to] = in_window.get(to, 0) + 1
    refused = sum(1 for a in alerts if a.get("kind") == "link" and a.get("event") == "refused")
    results = {
        r: after.results.get(r, 0.0) - before.results.get(r, 0.0)
        for r in ("answered", "late", "missing", "invalid")
    }
    cpu_name = f"cpu{cores[0]}"
    return {
        "endpoints": n,
        "linked": linked_at_end,
        "open_seconds": round(open_seconds, 3),
        "refused": refused,
        "endpoint_errors": fleet.errors if fleet is not None else {},
        "window_seconds": round(elapsed, 3),
        "answers_sent": fleet.answered if fleet is not None else 0,
        "answers_per_endpoint_second": (
            fleet.answered / (n * elapsed) if fleet is not None and n else math.nan
        ),
        "monitor_results": results,
        "state_changes_in_window": in_window,
        "state_changes_total": after_open,
        "states_at_end": after.states,
        "monitor_rtt": histogram_window(before, after),
        "endpoint_turnaround": quantiles(fleet.turnaround if fleet is not None else []),
        "challenge_spacing": quantiles(fleet.spacing if fleet is not None else []),
        "challenges_per_wakeup": quantiles(
            [float(b) for b in fleet.bursts] if fleet is not None else []
        ),
        "monitor_cpu": (cpu1 - cpu0) / elapsed,
        "monitor_loop_cpu": (loop1 - loop0) / elapsed,
        "endpoint_cpu": (own1.user + own1.system - own0.user - own0.system) / elapsed,
        "machine_busy_cores": busy_fraction(stat0, stat1, "cpu") * (len(stat1) - 1),
        "monitor_core_busy": busy_fraction(stat0, stat1, cpu_name),
        "monitor_rss_mib": round(rss, 1),
        "scrapes_in_window": [round(x.seconds, 3) for x in scrapes],
        "scrape_bytes": after.size,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "monitor_exit": code,
    }


# --- output -----------------------------------------------------------------------------


def ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| endpoints | linked (open s) | answers/s | monitor: answered / late / missing / invalid "
        "| alerts in window | states at end | monitor RTT p50 / p99 / max<= (ms) "
        "| endpoint turnaround p50 / p99 / max (ms) | challenge spacing p99 / max (s) "
        "| monitor CPU (loop) | endpoints CPU | machine busy (cores) | load avg |\n"
        "| ---: | ---: | ---: | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |\n"
    )
    rows = []
    for r in results:
        res, rtt = r["monitor_results"], r["monitor_rtt"]
        turn, gap = r["endpoint_turnaround"], r["challenge_spacing"]
        alerts = ", ".join(f"{k} {v}" for k, v in sorted(r["state_changes_in_window"].items()))
        states = ", ".join(f"{k} {v}" for k, v in sorted(r["states_at_end"].items()))
        rows.append(
            f"| {r['endpoints']} | {r['linked']} ({r['open_seconds']:.1f}) "
            f"| {r['answers_sent'] / r['window_seconds']:.0f} "
            f"| {res['answered']:.0f} / {res['late']:.0f} / {res['missing']:.0f} / "
            f"{res['invalid']:.0f} | {alerts or 'none'} | {states} "
            f"| {ms(rtt['p50'])} / {ms(rtt['p99'])} / {ms(rtt['max_le'])} "
            f"| {ms(turn['p50'])} / {ms(turn['p99'])} / {ms(turn['max'])} "
            f"| {gap['p99']:.3f} / {gap['max']:.3f} "
            f"| {r['monitor_cpu']:.0%} ({r['monitor_loop_cpu']:.0%}) | {r['endpoint_cpu']:.0%} "
            f"| {r['machine_busy_cores']:.2f} "
            f"| {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f} |"
        )
    return head + "\n".join(rows)


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": loadavg(),
    }


def raise_open_files(needed: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"need {needed} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", type=int, nargs="+", default=[250, 500, 1000, 1500])
    p.add_argument("--seconds", type=float, default=20.0, help="measurement window per size")
    p.add_argument("--batch", type=int, default=10, help="links opened at once (<= 100)")
    p.add_argument("--spread", type=float, default=INTERVAL, help="open over >= this (s)")
    p.add_argument(
        "--scrape-every",
        type=float,
        default=10.0,
        help="scrape the monitor this often in the window, as Prometheus would (0: only at "
        "the window's ends; default: deploy/examples/prometheus.yml's 10 s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--keep", action="store_true", help="keep the monitors' directories")
    args = p.parse_args()
    if not 1 <= args.batch <= 100 or args.seconds <= 0 or min(args.endpoints) < 1:
        p.error("--batch must be 1..100 (the monitor's backlog is 128), sizes and --seconds > 0")
    if args.spread < 0 or args.scrape_every < 0:
        p.error("--spread and --scrape-every must not be negative")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        p.error("needs two cores: one for the monitor, one for the endpoints")
    os.sched_setaffinity(0, {cores[1]})  # this process and the threads it starts
    limit = raise_open_files(max(args.endpoints) + 256)  # the monitor inherits it
    facts = machine()
    facts.update({"monitor_core": cores[0], "endpoint_core": cores[1], "nofile": limit})
    say(f"machine: {facts}")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    verifier = Ed25519PrivateKey.generate()
    home = Path(tempfile.mkdtemp(prefix="sgm-fleet-"))
    results = []
    try:
        for n in args.endpoints:
            results.append(run_size(n, args, verifier, home, cores))
            r = results[-1]
            say(
                f"[{n}] linked {r['linked']}, answers {r['answers_sent']}, "
                f"monitor {r['monitor_results']}, alerts {r['state_changes_in_window']}, "
                f"CPU {r['monitor_cpu']:.0%}, load {r['loadavg_after']}"
            )
    finally:
        if args.keep:
            say(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    facts["loadavg_at_end"] = loadavg()
    config = {
        "interval": INTERVAL,
        "seconds": args.seconds,
        "batch": args.batch,
        "spread": args.spread,
        "settle": SETTLE,
        "scrape_every": args.scrape_every,
    }
    if args.json:
        print(json.dumps({"machine": facts, "config": config, "results": results}, indent=1))
    else:
        print(table(results))
        print(f"machine: {json.dumps(facts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
