"""A whole deployment on this machine, for one command: the operator's convenience.

``sgmonitor ps --qemu SOCK`` (and ``bench``) run every party as its own process:

1. the hypervisor service makes its own key (``sgmonitor hypervisor keygen``);
2. an attestation service makes its own key, enrolls that hypervisor key, trusts the
   simulated platform, and verifies against a policy: the operator's ``--policy`` file,
   or one that pins the installed enclave (its measurement, signer and version, no
   debug), which is said on stderr;
3. the hypervisor service starts trusting only that attestation service;
4. a remote monitor starts, pinning that attestation service and the same policy;
5. the untrusted library starts the enclave, whose launch configuration names that
   attestation service and that monitor, links it to the monitor and registers an
   attested session key; the enclave's reports are opened by the monitor only.

Everything is stopped afterwards (the services also exit when their stdin, our pipe,
closes). Nothing here generates a key: each service makes its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import sgmonitor
from sgmonitor import installed
from sgmonitor.attestation.policy import Policy
from sgmonitor.daemon import read_ready_line, reap
from sgmonitor.errors import SGMonitorError
from sgmonitor.tee import backend_class
from sgmonitor.tee.boot import measure_installed
from sgmonitor.tee.launch_config import raw_ed25519
from sgmonitor.untrusted.library import (
    DEFAULT_CACHE_BUDGET,
    MonitorEndpoint,
    ScanResult,
    SecureMonitor,
    Verifier,
)

__all__ = ["LocalDeployment", "installed_policy", "local_deployment", "running_ids", "scan_qemu"]

_ROOT = Path(sgmonitor.__file__).resolve().parent.parent
_MODULE = (sys.executable, "-m")


@dataclass(frozen=True)
class LocalDeployment:
    """The services of one run: where they listen, their keys, their pids."""

    hypervisor_socket: str
    admin_socket: str
    hv_key: bytes
    verifier: Verifier
    monitor: MonitorEndpoint
    guests: tuple[str, ...]
    pids: tuple[int, ...]  # attestation service, hypervisor service, monitor
    decisions: Path  # the attestation service's JSON Lines log
    alerts: Path  # the monitor's alerts (JSON Lines)
    reports: Path  # every report the monitor opened (JSON Lines)
    home: Path
    metrics: str = ""  # the monitor's Prometheus endpoint, HOST:PORT, if asked for

    @property
    def vm(self) -> str:
        """The first guest's name."""
        return self.guests[0]

    def secure_monitor(self, vm: str | None = None, **options: Any) -> SecureMonitor:
        """An IDS on guest ``vm`` (default: the first) of this deployment: its enclave
        attested by this deployment's verifier, its reports sent to its monitor;
        ``options`` as :class:`SecureMonitor` takes them (not opened yet)."""
        return SecureMonitor(
            self.hypervisor_socket, vm or self.vm, self.verifier, self.monitor, **options
        )

    def records(
        self, monitor: SecureMonitor, check: str = "pslist"
    ) -> tuple[list[dict[str, int | str]], dict[str, object]]:
        """Scan once, and the records as the monitor opened them, with the scan's stats."""
        result, report = self._scan(monitor, check)
        return list(report["records"]), result.stats

    def report(self, monitor: SecureMonitor, check: str = "pslist") -> dict[str, Any]:
        """Scan once, and the report as the monitor opened it."""
        return self._scan(monitor, check)[1]

    def _scan(self, monitor: SecureMonitor, check: str) -> tuple[ScanResult, dict[str, Any]]:
        result = monitor.scan(check)
        return result, self.opened_report(monitor.ids, result.report_seq, link=monitor.link_id)

    def opened_report(
        self, ids: str, seq: int, timeout: float = 30.0, *, link: bytes = b""
    ) -> dict[str, Any]:
        """Report ``seq`` of IDS ``ids`` as the monitor opened it (what the operator
        reads; the host only ever carried it sealed), its ``records`` as dicts (the
        report carries rows under ``record_fields``). Give the link's id to tell a
        restarted IDS of the same name (whose reports count from 0 again) apart."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in read_json_lines(self.reports):
                same_link = not link or entry["link"] == link.hex()
                if entry["ids"] == ids and entry["seq"] == seq and same_link:
                    return _records_as_dicts(entry["report"])
            if time.monotonic() > deadline:
                raise SGMonitorError(f"the monitor opened no report {seq} from {ids!r}")
            time.sleep(0.02)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines file that another process appends to (the
    monitor's alerts and reports), none if there is no file yet. A line is complete once
    its newline is written: a report of a few hundred processes takes more than one
    write, so the last line may be read half written; it is left for the next read."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def _records_as_dicts(report: dict[str, Any]) -> dict[str, Any]:
    """A pslist report's rows as dicts keyed by its ``record_fields``."""
    fields = report.get("record_fields")
    if fields is not None:
        rows = report["records"]
        report = {**report, "records": [dict(zip(fields, r, strict=True)) for r in rows]}
    return report


def installed_policy(*, allow_unsealed: bool = False) -> Policy:
    """A policy that pins the installed enclave: its code measurement as measured now,
    and the signer, version and production (non-debug) flag of its installed SIGSTRUCT."""
    signed = backend_class("sim").signed_identity(installed.installed_sigstruct())
    return Policy(
        mrenclave=frozenset({measure_installed().mrenclave}),
        mrsigner=frozenset({signed.mrsigner}),
        min_isv_svn=signed.isv_svn,
        allow_debug=False,
        allow_unsealed=allow_unsealed,
    )


def _start(argv: list[str], what: str) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    argv = [*argv, "--exit-with-stdin"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_ROOT)
    try:
        return proc, read_ready_line(proc, 30.0, what)
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    with contextlib.suppress(OSError):
        proc.stdin.close()
    proc.terminate()
    reap(proc, 5.0)
    proc.stdout.close()


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


@contextlib.contextmanager
def local_deployment(
    guests: Mapping[str, str],
    *,
    policy: Policy | None = None,
    allow_unsealed: bool = False,
    say: Callable[[str], None] | None = None,
    statement_lifetime: float = 300.0,
    hypervisor_limits: Mapping[str, float] | None = None,
    heartbeat_interval: float = 2.0,
    monitor_limits: Mapping[str, float] | None = None,
    metrics: bool = False,
) -> Iterator[LocalDeployment]:
    """Start a hypervisor service for ``guests`` (name -> QMP socket) and an attestation
    service with ``policy`` (default: :func:`installed_policy`), as described above.
    ``hypervisor_limits`` are numeric keys of the hypervisor's configuration (for
    example ``max_pause``)."""
    home = Path(tempfile.mkdtemp(prefix="sgm-local-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if policy is None:
            policy = installed_policy(allow_unsealed=allow_unsealed)
            if say is not None:
                say(
                    "no --policy: a private attestation service pins the installed enclave "
                    f"(mrenclave {next(iter(policy.mrenclave)).hex()})"
                )
        keygen = [*_MODULE, "sgmonitor.hypervisor", "keygen", "--key"]
        hv_key = subprocess.run(
            [*keygen, str(home / "hv.pem")], cwd=_ROOT, check=True, capture_output=True
        ).stdout.strip()
        (home / "policy.toml").write_text(policy.to_toml())
        platform = raw_ed25519(installed.platform_public_key()).hex()
        (home / "attestation.toml").write_text(
            'listen = "127.0.0.1:0"\nkey = "attestation.pem"\npolicy = "policy.toml"\n'
            f'log = "decisions.jsonl"\nstatement_lifetime = {statement_lifetime}\n'
            f'[platforms]\nsim = ["{platform}"]\n'
            f'[[hypervisor]]\nname = "local"\npublic_key = "{hv_key.decode()}"\n'
        )
        proc, ready = _start(
            [
                *_MODULE,
                "sgmonitor.attestation",
                "serve",
                "--config",
                str(home / "attestation.toml"),
            ],
            "attestation service",
        )
        procs.append(proc)
        verifier_key = bytes.fromhex(str(ready["public_key"]))
        verifier = Verifier(str(ready["address"]), Ed25519PublicKey.from_public_bytes(verifier_key))
        guest_lines = "".join(f"{_toml_str(n)} = {_toml_str(q)}\n" for n, q in guests.items())
        (home / "hypervisor.toml").write_text(
            f'socket = "hv.sock"\nkey = "hv.pem"\nattestation_keys = ["{verifier_key.hex()}"]\n'
            f"allow_unsealed = {str(allow_unsealed).lower()}\n"
            + "".join(f"{k} = {v}\n" for k, v in (hypervisor_limits or {}).items())
            + f"[guests]\n{guest_lines}"
        )
        proc, ready = _start(
            [*_MODULE, "sgmonitor.hypervisor", "serve", "--config", str(home / "hypervisor.toml")],
            "hypervisor service",
        )
        procs.append(proc)
        hv_ready = ready
        (home / "monitor.toml").write_text(
            'listen = "127.0.0.1:0"\nkey = "monitor.pem"\npolicy = "policy.toml"\n'
            f'verifier_key = "{verifier_key.hex()}"\nlog = "alerts.jsonl"\n'
            f'reports = "reports.jsonl"\ninterval = {heartbeat_interval}\n'
            + ('metrics = "127.0.0.1:0"\n' if metrics else "")
            + "".join(f"{k} = {v}\n" for k, v in (monitor_limits or {}).items())
        )
        proc, ready = _start(
            [*_MODULE, "sgmonitor.monitor", "serve", "--config", str(home / "monitor.toml")],
            "monitor",
        )
        procs.append(proc)
        monitor = MonitorEndpoint(str(ready["address"]), bytes.fromhex(str(ready["public_key"])))
        yield LocalDeployment(
            hypervisor_socket=str(hv_ready["socket"]),
            admin_socket=str(hv_ready["admin_socket"]),
            hv_key=bytes.fromhex(hv_key.decode()),
            verifier=verifier,
            monitor=monitor,
            guests=tuple(guests),
            pids=tuple(p.pid for p in procs),
            decisions=home / "decisions.jsonl",
            alerts=home / "alerts.jsonl",
            reports=home / "reports.jsonl",
            home=home,
            metrics=str(ready.get("metrics", "")),
        )
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def running_ids(
    local: LocalDeployment,
    name: str,
    *,
    interval: float,
    checks: tuple[str, ...] = ("pslist",),
    stderr: int = subprocess.DEVNULL,
) -> Iterator[subprocess.Popen[bytes]]:
    """``sgmonitor ids run`` as its own process against ``local``'s services, scanning
    its first guest every ``interval`` seconds, ready (linked and attested) when
    yielded; stopped (continued first, if someone SIGSTOPped it) afterwards."""
    config = local.home / f"ids-{name}.toml"
    config.write_text(
        f"name = {_toml_str(name)}\nvm = {_toml_str(local.vm)}\n"
        f"hypervisor = {_toml_str(local.hypervisor_socket)}\n"
        f"attestation = {_toml_str(local.verifier.address)}\n"
        f'verifier_key = "{raw_ed25519(local.verifier.public_key).hex()}"\n'
        f'monitor = {_toml_str(local.monitor.address)}\nmonitor_key = "{local.monitor.key.hex()}"\n'
        f"interval = {interval}\nchecks = {json.dumps(list(checks))}\n"
    )
    proc = subprocess.Popen(
        [*_MODULE, "sgmonitor.cli", "ids", "run", "--config", str(config), "--exit-with-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        cwd=_ROOT,
    )
    try:
        read_ready_line(proc, 120.0, "ids run")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        _stop(proc)
        if proc.stderr is not None:
            proc.stderr.close()


def scan_qemu(
    qmp_socket: str,
    *,
    mode: str = "secure",
    check: str = "pslist",
    cache_budget: int = DEFAULT_CACHE_BUDGET,
    timeout: float = 30.0,
    policy: Policy | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One secure scan of a QEMU guest through a :func:`local_deployment`: the report as
    the monitor opened it (``records`` for pslist, ``findings`` for checks, ``stats``)."""
    unsealed = mode == "secure-plain"
    with local_deployment(
        {"guest": qmp_socket}, policy=policy, allow_unsealed=unsealed, say=say
    ) as local:
        ids = local.secure_monitor(mode=mode, cache_budget=cache_budget, timeout=timeout)
        with ids:
            result = ids.scan(check)
            return local.opened_report(ids.ids, result.report_seq, link=ids.link_id)
