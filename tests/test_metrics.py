"""The remote monitor's metrics, and the shipped alert rules on a real Prometheus.

The unit tests read the metrics' own registry and their HTTP endpoint; the integration
tests start Debian's Prometheus (``tests/prometheus.py``) with the rule file from
``deploy/prometheus``, scraping a :class:`MonitorMetrics` endpoint, and wait for each
alert in Prometheus's own API. A wrong metric name, label or rule fails them.
"""

from __future__ import annotations

import json
import math
import socket
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus import (
    ALERT_RULES,
    JOB,
    promtool,
    query,
    running_prometheus,
    wait_for_alert,
    wait_for_no_alert,
    wait_for_query,
)
from prometheus_client.parser import text_string_to_metric_families

from sgmonitor.monitor.metrics import (
    HEARTBEAT_RESULTS,
    REJECT_REASONS,
    STATES,
    MonitorMetrics,
)


def value(metrics: MonitorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def series_of(metrics: MonitorMetrics, ids: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (sample.name, sample.labels)
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.labels.get("ids") == ids
    ]


# --- unit -------------------------------------------------------------------------------


def test_states_are_exclusive() -> None:
    m = MonitorMetrics()
    for current in [*STATES, "ok"]:
        m.set_state("vm1", current)
        for s in STATES:
            expected = 1.0 if s == current else 0.0
            assert value(m, "sgmonitor_ids_state", ids="vm1", state=s) == expected
    m.set_state("vm2", "failed")
    assert value(m, "sgmonitor_ids_state", ids="vm1", state="ok") == 1.0
    assert value(m, "sgmonitor_ids_state", ids="vm2", state="failed") == 1.0


def test_heartbeats_count_and_answered_is_the_last_success() -> None:
    m = MonitorMetrics()
    m.heartbeat("vm", "answered", 0.002, at=1000.0)
    m.heartbeat("vm", "answered", 0.2, at=1001.0)
    m.heartbeat("vm", "late", 3.0, at=1002.0)
    m.heartbeat("vm", "missing", None, at=1003.0)
    m.heartbeat("vm", "invalid", None, at=1004.0)
    counts = {
        r: value(m, "sgmonitor_heartbeats_total", ids="vm", result=r) for r in HEARTBEAT_RESULTS
    }
    assert counts == {"answered": 2.0, "late": 1.0, "missing": 1.0, "invalid": 1.0}
    # Only an answered heartbeat is a success: the late one at 1002 is not.
    assert value(m, "sgmonitor_ids_last_success_timestamp_seconds", ids="vm") == 1001.0
    assert value(m, "sgmonitor_heartbeat_rtt_seconds_count", ids="vm") == 3.0
    assert value(m, "sgmonitor_heartbeat_rtt_seconds_sum", ids="vm") == pytest.approx(3.202)
    bucket = "sgmonitor_heartbeat_rtt_seconds_bucket"
    assert value(m, bucket, ids="vm", le="0.001") == 0.0
    assert value(m, bucket, ids="vm", le="0.0025") == 1.0
    assert value(m, bucket, ids="vm", le="0.25") == 2.0
    assert value(m, bucket, ids="vm", le="5.0") == 3.0


def test_counters_of_a_new_ids_start_at_zero() -> None:
    """Scraped at 0 first, so that Prometheus sees the first increase."""
    m = MonitorMetrics()
    m.set_state("vm", "starting")
    for r in HEARTBEAT_RESULTS:
        assert value(m, "sgmonitor_heartbeats_total", ids="vm", result=r) == 0.0
    for r in REJECT_REASONS:
        assert value(m, "sgmonitor_reports_rejected_total", ids="vm", reason=r) == 0.0
    assert value(m, "sgmonitor_scans_total", ids="vm") == 0.0
    assert value(m, "sgmonitor_heartbeat_rtt_seconds_count", ids="vm") == 0.0
    # No success yet: no timestamp at all rather than 1970.
    assert value(m, "sgmonitor_ids_last_success_timestamp_seconds", ids="vm") is None


def test_findings_scans_and_rejections_count() -> None:
    m = MonitorMetrics()
    m.finding("vm", "pslist", "high")
    m.finding("vm", "pslist", "high")
    m.finding("vm", "pslist", "low")
    m.finding("vm", "modules", "high")
    assert value(m, "sgmonitor_findings_total", ids="vm", check="pslist", severity="high") == 2
    assert value(m, "sgmonitor_findings_total", ids="vm", check="pslist", severity="low") == 1
    assert value(m, "sgmonitor_findings_total", ids="vm", check="modules", severity="high") == 1
    m.scan("vm", 0.5)
    m.scan("vm", 0.25)
    assert value(m, "sgmonitor_scans_total", ids="vm") == 2
    assert value(m, "sgmonitor_scan_duration_seconds", ids="vm") == 0.25
    m.report_rejected("vm", "forged")
    m.report_rejected("vm", "replayed")
    m.report_rejected("vm", "replayed")
    rejected = {
        r: value(m, "sgmonitor_reports_rejected_total", ids="vm", reason=r) for r in REJECT_REASONS
    }
    assert rejected == {"dropped": 0, "replayed": 2, "reordered": 0, "forged": 1}


def test_forget_removes_every_series_of_that_ids_only() -> None:
    m = MonitorMetrics()
    for ids in ("gone", "kept"):
        m.set_state(ids, "ok")
        m.heartbeat(ids, "answered", 0.01, at=5.0)
        m.finding(ids, "pslist", "high")
        m.scan(ids, 1.0)
        m.report_rejected(ids, "dropped")
    kept = series_of(m, "kept")
    assert len(series_of(m, "gone")) == len(kept) > 0
    m.forget("gone")
    assert series_of(m, "gone") == []
    assert series_of(m, "kept") == kept
    m.forget("gone")  # again: harmless
    m.forget("never-seen")
    # A forgotten IDS that comes back starts afresh.
    m.heartbeat("gone", "missing", None, at=6.0)
    assert value(m, "sgmonitor_heartbeats_total", ids="gone", result="missing") == 1.0
    assert value(m, "sgmonitor_heartbeats_total", ids="gone", result="answered") == 0.0
    assert value(m, "sgmonitor_findings_total", ids="gone", check="pslist", severity="high") is None


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.set_state("vm", "dead"),
        lambda m: m.set_state("vm", "OK"),
        lambda m: m.set_state("", "ok"),
        lambda m: m.heartbeat("vm", "lost", None, at=1.0),
        lambda m: m.heartbeat("vm", "missing", 0.1, at=1.0),
        lambda m: m.heartbeat("vm", "answered", -0.1, at=1.0),
        lambda m: m.heartbeat("vm", "answered", math.nan, at=1.0),
        lambda m: m.heartbeat("vm", "answered", 0.1, at=math.inf),
        lambda m: m.heartbeat("vm", "answered", "0.1", at=1.0),
        lambda m: m.finding("vm", "", "high"),
        lambda m: m.finding("vm", "pslist", ""),
        lambda m: m.scan("vm", -1.0),
        lambda m: m.report_rejected("vm", "tampered"),
        lambda m: m.forget(""),
    ],
)
def test_bad_inputs_are_refused(call: Callable[[MonitorMetrics], None]) -> None:
    m = MonitorMetrics()
    with pytest.raises(ValueError):
        call(m)
    # Nothing half-done: no series was made for the refused call.
    assert series_of(m, "vm") == []


@pytest.mark.parametrize("address", ["127.0.0.1", ":0", "127.0.0.1:x", "127.0.0.1:70000", "::1:0"])
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError):
        MonitorMetrics().serve(address)


def test_endpoint_serves_the_text_format_where_told_and_stops() -> None:
    m = MonitorMetrics()
    m.set_state("vm", "ok")
    m.finding("vm", "pslist", "high")
    bound, stop = m.serve("127.0.0.1:0")
    try:
        host, port = bound.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with urllib.request.urlopen(f"http://{bound}/metrics", timeout=5) as response:
            content_type = response.headers["Content-Type"]
            body = response.read().decode()
        assert content_type.startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(body)}
        states = {s.labels["state"]: s.value for s in families["sgmonitor_ids_state"].samples}
        assert states == {s: (1.0 if s == "ok" else 0.0) for s in STATES}
        assert families["sgmonitor_findings"].type == "counter"
        assert families["sgmonitor_heartbeat_rtt_seconds"].type == "histogram"
        # Bound only where told: another loopback address of this machine is refused.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", int(port)), timeout=5).close()
    finally:
        stop()
    stop()  # again: harmless
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()


def test_endpoint_on_ipv6_loopback() -> None:
    bound, stop = MonitorMetrics().serve("[::1]:0")
    try:
        assert bound.startswith("[::1]:")
        with urllib.request.urlopen(f"http://{bound}/metrics", timeout=5) as response:
            assert response.status == 200
    finally:
        stop()


def test_rule_file_passes_promtool() -> None:
    result = promtool("check", "rules", str(ALERT_RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- on a real Prometheus -----------------------------------------------------------------


@pytest.fixture(scope="module")
def scraped() -> Iterator[tuple[MonitorMetrics, str]]:
    """A MonitorMetrics endpoint, and the base URL of a Prometheus scraping it."""
    metrics = MonitorMetrics()
    bound, stop = metrics.serve("127.0.0.1:0")
    try:
        with running_prometheus([bound], ALERT_RULES) as base_url:
            yield metrics, base_url
    finally:
        stop()


def test_state_reaches_prometheus(scraped: tuple[MonitorMetrics, str]) -> None:
    m, url = scraped
    m.set_state("vm-ok", "ok")
    result = wait_for_query(url, 'sgmonitor_ids_state{ids="vm-ok"} == 1')
    assert len(result) == 1
    assert result[0]["metric"]["state"] == "ok"
    assert result[0]["metric"]["job"] == JOB
    assert result[0]["value"][1] == "1"
    assert len(query(url, 'sgmonitor_ids_state{ids="vm-ok"} == 0')) == len(STATES) - 1


def test_failed_ids_fires_and_recovers(scraped: tuple[MonitorMetrics, str]) -> None:
    m, url = scraped
    m.set_state("vm-bystander", "ok")
    m.set_state("vm-fail", "ok")
    wait_for_query(url, 'sgmonitor_ids_state{ids="vm-fail",state="ok"} == 1')
    m.set_state("vm-fail", "failed")
    alert = wait_for_alert(url, "SGMonitorIDSFailed", {"ids": "vm-fail"}, timeout=30)
    assert alert["labels"]["severity"] == "critical"
    assert "vm-fail" in alert["annotations"]["summary"]
    assert "vm-fail" in alert["annotations"]["description"]
    firing = [
        a["metric"]["ids"]
        for a in query(url, 'ALERTS{alertname="SGMonitorIDSFailed",alertstate="firing"}')
    ]
    assert firing == ["vm-fail"]
    m.set_state("vm-fail", "ok")
    wait_for_no_alert(url, "SGMonitorIDSFailed", {"ids": "vm-fail"}, timeout=30)


@pytest.mark.parametrize(
    ("state", "alertname"), [("stalled", "SGMonitorIDSStalled"), ("invalid", "SGMonitorIDSInvalid")]
)
def test_stalled_and_invalid_fire(
    scraped: tuple[MonitorMetrics, str], state: str, alertname: str
) -> None:
    m, url = scraped
    ids = f"vm-{state}"
    m.set_state(ids, state)
    alert = wait_for_alert(url, alertname, {"ids": ids}, timeout=30)
    assert alert["labels"]["severity"] == "critical"
    assert ids in alert["annotations"]["summary"]


def test_first_finding_fires(scraped: tuple[MonitorMetrics, str]) -> None:
    """The finding's series is born at 1: the rule must catch it all the same."""
    m, url = scraped
    m.set_state("vm-find", "ok")
    m.finding("vm-find", "pslist", "high")
    alert = wait_for_alert(
        url, "SGMonitorFinding", {"ids": "vm-find", "check": "pslist"}, timeout=30
    )
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["finding_severity"] == "high"
    assert "vm-find" in alert["annotations"]["summary"]
    assert "high" in alert["annotations"]["description"]


def test_rejected_report_fires(scraped: tuple[MonitorMetrics, str]) -> None:
    m, url = scraped
    m.set_state("vm-tampered", "ok")
    wait_for_query(url, 'sgmonitor_reports_rejected_total{ids="vm-tampered",reason="forged"} == 0')
    m.report_rejected("vm-tampered", "forged")
    alert = wait_for_alert(
        url, "SGMonitorReportRejected", {"ids": "vm-tampered", "reason": "forged"}, timeout=30
    )
    assert alert["labels"]["severity"] == "warning"
    assert "vm-tampered" in alert["annotations"]["summary"]
    assert "forged" in alert["annotations"]["summary"]
    # The other reasons of the same IDS, still at 0, do not alert.
    rejected = query(url, 'ALERTS{alertname="SGMonitorReportRejected",ids="vm-tampered"}')
    assert {a["metric"]["reason"] for a in rejected} == {"forged"}


def test_quiet_ids_raise_no_alert(scraped: tuple[MonitorMetrics, str]) -> None:
    """Counters at 0 and a good state alert nothing (or every rule would always fire)."""
    m, url = scraped
    m.set_state("vm-calm", "ok")
    m.heartbeat("vm-calm", "answered", 0.003, at=1.0)
    wait_for_query(url, 'sgmonitor_heartbeats_total{ids="vm-calm",result="answered"} == 1')
    # A few scrapes and rule evaluations later, still nothing.
    wait_for_query(url, 'count_over_time(sgmonitor_ids_state{ids="vm-calm",state="ok"}[1m]) >= 3')
    assert query(url, 'ALERTS{ids="vm-calm"}') == []


# --- the rules' logic over time, in promtool's rule unit tests ---------------------------


def _scraped(name: str, labels: dict[str, str]) -> str:
    """The series ``name{labels}`` as scraped from a monitor (with job and instance)."""
    full = {"job": JOB, "instance": "monitor:9", **labels}
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(full.items())) + "}"


def _series(name: str, values: list[int | None], **labels: str) -> dict[str, str]:
    """An input series with one sample a minute from 0m (None: no sample)."""
    return {
        "series": _scraped(name, labels),
        "values": " ".join("_" if v is None else str(v) for v in values),
    }


def _alerts_at(minute: int, *expected: dict[str, str]) -> dict[str, object]:
    """At ``minute``, exactly the ``expected`` alerts (labels without job and instance)."""
    samples = [{"labels": _scraped("ALERTS", labels), "value": 1} for labels in expected]
    return {"expr": "ALERTS", "eval_time": f"{minute}m", "exp_samples": samples}


def _alert(name: str, alertstate: str, severity: str, **labels: str) -> dict[str, str]:
    return {"alertname": name, "alertstate": alertstate, "severity": severity, **labels}


def test_rules_over_time_with_promtool(tmp_path: Path) -> None:
    """What the live tests cannot wait for: an old finding stops alerting after 5 minutes
    and a later one fires again, counters at 0 never alert, ``for`` holds a late IDS."""
    finding = {"ids": "a", "check": "pslist", "finding_severity": "high"}
    findings = [
        # No series until 10m, 1 from 10m, 2 from 30m.
        _series(
            "sgmonitor_findings_total",
            [None] * 10 + [1] * 20 + [2] * 20,
            ids="a",
            check="pslist",
            severity="high",
        ),
    ]
    fired = _alert("SGMonitorFinding", "firing", "critical", **finding)
    finding_checks = [
        _alerts_at(9),
        _alerts_at(10, fired),  # born at 1: new
        _alerts_at(14, fired),
        _alerts_at(16),  # an old finding no longer alerts
        _alerts_at(30, fired),  # another one: an increase
        _alerts_at(34, fired),
        _alerts_at(36),
    ]
    rejected = [
        _series("sgmonitor_reports_rejected_total", [0] * 10 + [1] * 20, ids="a", reason="forged"),
        _series(
            "sgmonitor_reports_rejected_total", [None] * 10 + [1] * 20, ids="a", reason="replayed"
        ),
        _series("sgmonitor_reports_rejected_total", [0] * 30, ids="a", reason="dropped"),
    ]
    rejected_checks = [
        _alerts_at(9),
        _alerts_at(
            10,
            _alert("SGMonitorReportRejected", "firing", "warning", ids="a", reason="forged"),
            _alert("SGMonitorReportRejected", "firing", "warning", ids="a", reason="replayed"),
        ),
        _alerts_at(16),
    ]
    # ok until 5m, then 5 minutes in each bad state in turn, ok again from 25m.
    bad_from = {"failed": 5, "stalled": 10, "invalid": 15, "late": 20}
    states = [
        _series(
            "sgmonitor_ids_state",
            [int(bad_from[s] <= minute < bad_from[s] + 5) for minute in range(30)],
            ids="b",
            state=s,
        )
        for s in bad_from
    ]
    states.append(
        _series(
            "sgmonitor_ids_state",
            [int(not 5 <= minute < 25) for minute in range(30)],
            ids="b",
            state="ok",
        )
    )
    state_checks = [
        _alerts_at(4),
        _alerts_at(5, _alert("SGMonitorIDSFailed", "firing", "critical", ids="b", state="failed")),
        _alerts_at(
            10, _alert("SGMonitorIDSStalled", "firing", "critical", ids="b", state="stalled")
        ),
        _alerts_at(
            15, _alert("SGMonitorIDSInvalid", "firing", "critical", ids="b", state="invalid")
        ),
        _alerts_at(20, _alert("SGMonitorIDSLate", "pending", "warning", ids="b", state="late")),
        _alerts_at(21, _alert("SGMonitorIDSLate", "firing", "warning", ids="b", state="late")),
        _alerts_at(25),
    ]
    tests = [
        {"interval": "1m", "input_series": series, "promql_expr_test": checks}
        for series, checks in [
            (findings, finding_checks),
            (rejected, rejected_checks),
            (states, state_checks),
        ]
    ]
    spec = tmp_path / "sgmonitor-alerts.test.yml"
    spec.write_text(
        json.dumps(
            {
                "rule_files": [str(ALERT_RULES)],
                "evaluation_interval": "1m",
                "tests": tests,
            }
        )
    )
    result = promtool("test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr
