"""The remote monitor's metrics, in the Prometheus text format.

The remote monitor is the party that notices when an IDS stops answering, answers
wrongly or reports something. Operators already run Prometheus and Alertmanager, so the
monitor says what it sees as metrics and the alerting is left to the engine they trust
(the rules ship in ``deploy/prometheus/sgmonitor-alerts.yml``). One :class:`MonitorMetrics`
per monitor, with a registry of its own: nothing else in the process (or another
monitor in the same process, such as a test's) leaks into what is scraped.

Every label value the monitor sets is checked here, at the boundary: a misspelt state
or reason would otherwise make a series that no alert rule matches, and the alert
would silently never fire.
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

__all__ = [
    "HEARTBEAT_RESULTS",
    "REJECT_REASONS",
    "RTT_BUCKETS",
    "STATES",
    "MonitorMetrics",
]

#: An IDS's states as the monitor judges them; ``starting`` until its first answer.
STATES = ("starting", "ok", "late", "failed", "stalled", "invalid")
#: What became of one heartbeat challenge.
HEARTBEAT_RESULTS = ("answered", "late", "missing", "invalid")
#: Why a sealed report from the IDS was not accepted.
REJECT_REASONS = ("dropped", "replayed", "reordered", "forged")
#: Round trips from a loopback answer (about 1 ms) to the longest deadline (5 s).
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MonitorMetrics:
    """The monitor's view of each IDS (label ``ids``), for Prometheus to scrape.

    Thread-safe: the monitor may update it from several threads while the exposition
    endpoint serves scrapes from its own.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._state = Gauge(
            "sgmonitor_ids_state",
            "1 for the IDS's current state, 0 for the others.",
            ["ids", "state"],
            registry=r,
        )
        self._last_success = Gauge(
            "sgmonitor_ids_last_success_timestamp_seconds",
            "Unix time of the IDS's last answered heartbeat.",
            ["ids"],
            registry=r,
        )
        self._rtt = Histogram(
            "sgmonitor_heartbeat_rtt_seconds",
            "Heartbeat round trip, challenge sent to answer received.",
            ["ids"],
            buckets=RTT_BUCKETS,
            registry=r,
        )
        self._challenges = Counter(
            "sgmonitor_challenges_total",
            "Heartbeat challenges the monitor sent the IDS.",
            ["ids"],
            registry=r,
        )
        self._heartbeats = Counter(
            "sgmonitor_heartbeats_total",
            "Heartbeat challenges by what became of them.",
            ["ids", "result"],
            registry=r,
        )
        self._findings = Counter(
            "sgmonitor_findings_total",
            "Findings the IDS reported (sealed reports the monitor accepted).",
            ["ids", "check", "severity"],
            registry=r,
        )
        self._scan_duration = Gauge(
            "sgmonitor_scan_duration_seconds",
            "Duration of the IDS's last scan.",
            ["ids"],
            registry=r,
        )
        self._scans = Counter(
            "sgmonitor_scans_total",
            "Scans the IDS reported.",
            ["ids"],
            registry=r,
        )
        self._rejected = Counter(
            "sgmonitor_reports_rejected_total",
            "Reports from the IDS the monitor did not accept, by reason.",
            ["ids", "reason"],
            registry=r,
        )
        self._lock = threading.Lock()
        # Every series made for an IDS, so that forget() removes exactly those, whatever
        # the prometheus-client version offers for removal.
        self._series: dict[str, set[tuple[Gauge | Counter | Histogram, tuple[str, ...]]]] = {}

    def set_state(self, ids: str, state: str) -> None:
        """Make ``state`` the IDS's only state with value 1 (the others go to 0).

        All six series exist once any is set, so a rule can match ``== 1`` on one state
        and a dashboard sees the transitions as 0/1 steps.
        """
        _check_name("ids", ids)
        _check_choice("state", state, STATES)
        with self._lock:
            self._known(ids)
            for s in STATES:
                self._state.labels(ids, s).set(1 if s == state else 0)
                self._series[ids].add((self._state, (ids, s)))

    def heartbeat(self, ids: str, result: str, rtt: float | None, at: float) -> None:
        """Count one heartbeat challenge's ``result``; observe its round trip if it has one.

        ``at`` is the Unix time the monitor judged it; an ``answered`` heartbeat makes it
        the last success (a late, missing or invalid one is not a success). A missing
        heartbeat has no round trip.
        """
        _check_name("ids", ids)
        _check_choice("result", result, HEARTBEAT_RESULTS)
        _check_time("at", at)
        if rtt is not None:
            _check_time("rtt", rtt)
            if result == "missing":
                raise ValueError("a missing heartbeat has no round trip (rtt must be None)")
        with self._lock:
            self._known(ids)
            self._heartbeats.labels(ids, result).inc()
            if rtt is not None:
                self._rtt.labels(ids).observe(rtt)
            if result == "answered":
                self._last_success.labels(ids).set(at)
                self._series[ids].add((self._last_success, (ids,)))

    def challenge(self, ids: str) -> None:
        """Count one challenge sent (each ends as one ``heartbeat`` result, or is pending)."""
        _check_name("ids", ids)
        with self._lock:
            self._known(ids)
            self._challenges.labels(ids).inc()

    def finding(self, ids: str, check: str, severity: str) -> None:
        """Count one finding of the IDS's ``check`` at ``severity`` (as the report said)."""
        _check_name("ids", ids)
        _check_name("check", check)
        _check_name("severity", severity)
        with self._lock:
            self._known(ids)
            self._findings.labels(ids, check, severity).inc()
            self._series[ids].add((self._findings, (ids, check, severity)))

    def scan(self, ids: str, duration: float) -> None:
        """Count one scan the IDS reported, and keep its duration as the last one."""
        _check_name("ids", ids)
        _check_time("duration", duration)
        with self._lock:
            self._known(ids)
            self._scans.labels(ids).inc()
            self._scan_duration.labels(ids).set(duration)
            self._series[ids].add((self._scan_duration, (ids,)))

    def report_rejected(self, ids: str, reason: str) -> None:
        """Count one report from the IDS that the monitor refused, and why."""
        _check_name("ids", ids)
        _check_choice("reason", reason, REJECT_REASONS)
        with self._lock:
            self._known(ids)
            self._rejected.labels(ids, reason).inc()

    def forget(self, ids: str) -> None:
        """Remove every series of the IDS (one no longer monitored must not keep alerting).

        Unknown IDS names are ignored: forgetting twice is harmless.
        """
        _check_name("ids", ids)
        with self._lock:
            for metric, labels in self._series.pop(ids, ()):
                metric.remove(*labels)

    def serve(self, address: str) -> tuple[str, Callable[[], None]]:
        """Serve the exposition endpoint on ``HOST:PORT`` (port 0: a free one) until stopped.

        Binds only the address given (``[::1]:PORT`` for IPv6). Returns the bound
        ``HOST:PORT`` and a function that stops the server, waits for its thread and
        closes the socket; calling it again does nothing.
        """
        host, port = _parse_address(address)
        v6 = ":" in host
        server_class = _ThreadingWSGIServer6 if v6 else _ThreadingWSGIServer
        server = make_server(
            host, port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler
        )
        thread = threading.Thread(
            target=server.serve_forever, name=f"sgmonitor-metrics {address}", daemon=True
        )
        thread.start()
        bound_port = server.server_address[1]
        bound = f"[{host}]:{bound_port}" if v6 else f"{host}:{bound_port}"
        stopped = threading.Event()

        def stop() -> None:
            if stopped.is_set():
                return
            stopped.set()
            server.shutdown()
            thread.join()
            server.server_close()

        return bound, stop

    def _known(self, ids: str) -> None:
        """On an IDS's first mention, make its fixed-label counters at 0.

        A counter series that first appears at 1 shows no ``increase()`` to Prometheus;
        one that was scraped at 0 first does. (Findings cannot be made in advance: their
        checks and severities are only known when reported.) Called with the lock held.
        """
        if ids in self._series:
            return
        made: set[tuple[Gauge | Counter | Histogram, tuple[str, ...]]] = set()
        for result in HEARTBEAT_RESULTS:
            self._heartbeats.labels(ids, result)
            made.add((self._heartbeats, (ids, result)))
        for reason in REJECT_REASONS:
            self._rejected.labels(ids, reason)
            made.add((self._rejected, (ids, reason)))
        self._rtt.labels(ids)
        made.add((self._rtt, (ids,)))
        self._scans.labels(ids)
        made.add((self._scans, (ids,)))
        self._challenges.labels(ids)
        made.add((self._challenges, (ids,)))
        self._series[ids] = made


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """A scrape per thread, so a slow scraper does not hold up the next one."""

    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: a scrape every second would drown the monitor's output."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def _parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6HOST]:PORT`` -> (host, port); an empty host is refused."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 host is written in brackets: {address!r}")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host, int(port_text)


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: one of {', '.join(choices)}")


def _check_time(what: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and not negative, got {value!r}")
