"""A real Prometheus server for tests: Debian's ``/usr/bin/prometheus``, on loopback.

Each :func:`running_prometheus` is a server of the test's own: its own configuration and
data directory in a temporary directory, a free port on 127.0.0.1, scrapes and rule
evaluations every second. It never touches a system Prometheus (``/etc/prometheus``,
``/var/lib/prometheus``, port 9090) and is stopped by its PID when the block ends.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
REPO = Path(__file__).resolve().parent.parent
#: The alert rules SGmonitor ships.
ALERT_RULES = REPO / "deploy" / "prometheus" / "sgmonitor-alerts.yml"
#: The scrape job's name, as the ``job`` label of every scraped series.
JOB = "sgmonitor"


@contextlib.contextmanager
def running_prometheus(
    targets: list[str], rules: Path, *, ready_timeout: float = 60.0
) -> Iterator[str]:
    """Run Prometheus scraping ``targets`` (``HOST:PORT``) with ``rules``; yield its base URL.

    Fails the test (no skip) when the binary is missing: the project's set-up installs it.
    """
    if not PROMETHEUS.is_file():
        pytest.fail(f"{PROMETHEUS} is missing: run scripts/bootstrap (Debian's prometheus)")
    with tempfile.TemporaryDirectory(prefix="sgmonitor-prometheus-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        # JSON is YAML: no YAML writer needed.
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules.resolve())],
                    "scrape_configs": [
                        {"job_name": JOB, "static_configs": [{"targets": list(targets)}]}
                    ],
                },
                indent=2,
            )
        )
        # A free port can be taken between our probe and Prometheus's bind: try again.
        for attempt in range(3):
            port = _free_port()
            log = Path(tmp) / f"prometheus-{attempt}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [
                        str(PROMETHEUS),
                        f"--config.file={config}",
                        f"--storage.tsdb.path={Path(tmp) / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            base_url = f"http://127.0.0.1:{port}"
            try:
                if _wait_ready(proc, base_url, ready_timeout):
                    yield base_url
                    return
            finally:
                _stop(proc)
            text = log.read_text(errors="replace")
            if "address already in use" not in text:
                break
        pytest.fail(f"Prometheus did not become ready; its log:\n{text[-4000:]}")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run Debian's ``promtool`` (from the same package); its output is in the result."""
    if not PROMTOOL.is_file():
        pytest.fail(f"{PROMTOOL} is missing: run scripts/bootstrap (Debian's prometheus)")
    return subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, timeout=120, check=False
    )


def query(base_url: str, promql: str) -> list[dict[str, Any]]:
    """The result of an instant query (``/api/v1/query``): a list of ``{metric, value}``."""
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    data = _get_json(url)
    if data["data"]["resultType"] != "vector":
        raise AssertionError(f"{promql!r} is not an instant vector: {data}")
    return data["data"]["result"]


def wait_for_query(
    base_url: str, promql: str, predicate: Any = bool, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Poll an instant query until ``predicate(result)`` holds; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = query(base_url, promql)
        if predicate(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout} s, {promql!r} still gives {result}")
        time.sleep(0.25)


def alerts(base_url: str) -> list[dict[str, Any]]:
    """Prometheus's active alerts (``/api/v1/alerts``): pending and firing."""
    return _get_json(f"{base_url}/api/v1/alerts")["data"]["alerts"]


def wait_for_alert(
    base_url: str,
    alertname: str,
    labels: Mapping[str, str],
    state: str = "firing",
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Poll until an alert ``alertname`` whose labels include ``labels`` is in ``state``.

    Returns that alert (``labels``, ``annotations``, ``state``, ``activeAt``, ``value``);
    fails after ``timeout`` seconds, showing the alerts of that name it saw last.
    """
    deadline = time.monotonic() + timeout
    while True:
        named = [a for a in alerts(base_url) if a["labels"].get("alertname") == alertname]
        for alert in named:
            if alert["state"] == state and all(
                alert["labels"].get(k) == v for k, v in labels.items()
            ):
                return alert
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no {state} {alertname} with labels {dict(labels)} after {timeout} s; "
                f"alerts of that name: {named}"
            )
        time.sleep(0.25)


def wait_for_no_alert(
    base_url: str, alertname: str, labels: Mapping[str, str], timeout: float = 30.0
) -> None:
    """Poll until no alert ``alertname`` with ``labels`` is pending or firing."""
    deadline = time.monotonic() + timeout
    while True:
        matching = [
            a
            for a in alerts(base_url)
            if a["labels"].get("alertname") == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]
        if not matching:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{alertname} {dict(labels)} still active: {matching}")
        time.sleep(0.25)


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        data = json.load(response)
    if data.get("status") != "success":
        raise AssertionError(f"{url}: {data}")
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, timeout: float) -> bool:
    """True once ``/-/ready`` answers 200; False if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base_url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to our Prometheus's PID, then SIGKILL if it has not exited in 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
