"""The deployment examples (deploy/examples, deploy/systemd) are what the code accepts.

Each example configuration is copied to a temporary directory, its ``"<...>"``
placeholders are filled with real values (keys made here, the installed enclave's
measurement, a real signer's MRSIGNER), and it is loaded by the loader its party uses;
the values must come through. Unfilled, every loader must refuse it. The Prometheus
configuration goes through ``promtool check config`` with the shipped alert rules beside
it. The systemd units must start the right party with the right file and let it write
where its example configuration keeps keys, logs and sockets.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sgmonitor.attestation.policy import Policy, PolicyError
from sgmonitor.attestation.service import AttestationConfig
from sgmonitor.errors import SGMonitorError
from sgmonitor.hypervisor.__main__ import load_config
from sgmonitor.keywrap import raw_public_key
from sgmonitor.monitor.service import MonitorConfig
from sgmonitor.tee import backend_class, sign_enclave_for
from sgmonitor.tee.boot import measure_installed
from sgmonitor.tee.launch_config import raw_ed25519
from sgmonitor.untrusted.ids_run import IdsConfig
from sgmonitor.wire.core import parse_address

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "deploy" / "examples"
UNITS = REPO / "deploy" / "systemd"
ALERT_RULES = REPO / "deploy" / "prometheus" / "sgmonitor-alerts.yml"
PROMTOOL = Path("/usr/bin/promtool")
TOMLS = ("attestation.toml", "policy.toml", "hypervisor.toml", "monitor.toml", "ids.toml")
PLACEHOLDER = re.compile(r'"(<[^"]*>)"')


def _placeholders(text: str) -> list[str]:
    """The placeholders in the values of ``text`` (comments may mention them too)."""
    return [p for line in text.splitlines() for p in PLACEHOLDER.findall(line.split("#")[0])]


# Which value a placeholder asks for, by the words it says it in.
KINDS = {
    "sim platform key": "platform",
    "hypervisor key": "hypervisor",
    "attestation service key": "verifier",
    "remote monitor key": "monitor",
    "MRENCLAVE": "mrenclave",
    "MRSIGNER": "mrsigner",
}


@pytest.fixture(scope="module")
def values() -> dict[str, bytes]:
    """Real values for every kind of placeholder."""
    mrenclave = measure_installed().mrenclave
    signer = Ed25519PrivateKey.generate()
    sigstruct = sign_enclave_for("sim", signer, mrenclave=mrenclave, isv_svn=1)
    signed = backend_class("sim").signed_identity(sigstruct)
    assert signed.mrenclave == mrenclave
    return {
        "platform": raw_ed25519(Ed25519PrivateKey.generate().public_key()),
        "hypervisor": raw_public_key(X25519PrivateKey.generate().public_key()),
        "verifier": raw_ed25519(Ed25519PrivateKey.generate().public_key()),
        "monitor": raw_public_key(X25519PrivateKey.generate().public_key()),
        "mrenclave": mrenclave,
        "mrsigner": signed.mrsigner,
    }


def _kind(placeholder: str) -> str:
    kinds = [kind for words, kind in KINDS.items() if words in placeholder]
    assert len(kinds) == 1, f"placeholder {placeholder!r} names no single known value"
    return kinds[0]


def _copy(tmp_path: Path, filled: dict[str, bytes] | None) -> Path:
    """The examples in ``tmp_path``, placeholders filled from ``filled`` (None: as shipped)."""
    for name in TOMLS:
        text = (EXAMPLES / name).read_text()
        for placeholder in _placeholders(text):
            assert placeholder.startswith("<64 hex: "), placeholder
            kind = _kind(placeholder)
            if filled is not None:
                text = text.replace(f'"{placeholder}"', f'"{filled[kind].hex()}"')
        if filled is not None:
            assert not _placeholders(text), name
        (tmp_path / name).write_text(text)
    return tmp_path


def _port(address: str) -> int:
    _, where = parse_address(address)
    assert isinstance(where, tuple)
    return where[1]


def test_every_example_is_toml_with_marked_placeholders() -> None:
    seen = set()
    for name in TOMLS:
        text = (EXAMPLES / name).read_text()
        tomllib.loads(text)
        seen |= {_kind(p) for p in _placeholders(text)}
        # no placeholder outside quotes (it would not parse) or unmarked
        for line in text.splitlines():
            code = line.split("#")[0]
            assert code.count("<") == code.count('"<64 hex: '), line
    assert seen == set(KINDS.values())


def test_filled_examples_load_with_the_parties_loaders(
    tmp_path: Path, values: dict[str, bytes]
) -> None:
    d = _copy(tmp_path, values)

    policy = Policy.load(d / "policy.toml")
    assert policy.mrenclave == {values["mrenclave"]}
    assert policy.mrsigner == {values["mrsigner"]}
    assert (policy.min_isv_svn, policy.allow_debug, policy.allow_unsealed) == (1, False, False)

    att = AttestationConfig.load(d / "attestation.toml")
    assert att.listen == "0.0.0.0:7380"
    assert att.key == Path("/var/lib/sgmonitor-attestation/attestation.pem")
    assert att.log == Path("/var/log/sgmonitor-attestation/decisions.jsonl")
    assert att.policy == policy
    assert [raw_ed25519(k) for k in att.platforms["sim"]] == [values["platform"]]
    assert dict(att.hypervisors) == {values["hypervisor"]: "host-17"}
    assert (att.statement_lifetime, att.nonce_lifetime) == (300.0, 60.0)

    socket, key, guests, hv = load_config(d / "hypervisor.toml")
    assert socket == "/run/sgmonitor-hypervisor/hv.sock"
    assert key == Path("/var/lib/sgmonitor-hypervisor/hv.pem")
    assert dict(guests) == {"web": "/run/qemu/web/qmp.sock"}
    assert [raw_ed25519(k) for k in hv.attestation_keys] == [values["verifier"]]
    assert (hv.max_pause, hv.pause_window, hv.session_lifetime) == (30.0, 120.0, 3600.0)
    assert (hv.remembered_sessions, hv.allow_unsealed) == (100_000, False)

    mon = MonitorConfig.load(d / "monitor.toml")
    assert mon.listen == "0.0.0.0:7390"
    assert mon.key == Path("/var/lib/sgmonitor-monitor/monitor.pem")
    assert raw_ed25519(mon.verifier_key) == values["verifier"]
    assert mon.policy == policy
    assert mon.log == Path("/var/log/sgmonitor-monitor/alerts.jsonl")
    assert mon.reports == Path("/var/log/sgmonitor-monitor/reports.jsonl")
    assert mon.metrics == "127.0.0.1:9390"
    assert (mon.interval, mon.failed_after, mon.stall_after) == (2.0, 3, 60.0)

    ids = IdsConfig.load(d / "ids.toml")
    assert (ids.name, ids.vm, ids.mode, ids.checks) == ("web-ids", "web", "secure", ("pslist",))
    assert ids.hypervisor == "/run/sgmonitor-hv-relay/hv.sock"
    assert ids.verifier.address == "attestation.example.org:7380"
    assert raw_ed25519(ids.verifier.public_key) == values["verifier"]
    assert ids.monitor.address == "monitor.example.org:7390"
    assert ids.monitor.key == values["monitor"]
    assert (ids.interval, ids.cache_budget) == (10.0, 32 << 20)

    # The parties' examples agree with each other.
    assert ids.vm in guests
    assert _port(ids.verifier.address) == _port(att.listen)
    assert _port(ids.monitor.address) == _port(mon.listen)


def test_unfilled_examples_are_refused(tmp_path: Path) -> None:
    """A placeholder left in place is an error at start, never a silently empty trust."""
    d = _copy(tmp_path, None)
    with pytest.raises(PolicyError):
        Policy.load(d / "policy.toml")
    (d / "policy.toml").write_text(f'mrenclave = ["{"00" * 32}"]\n')  # to reach the others
    loaders = [
        (AttestationConfig.load, "attestation.toml"),
        (load_config, "hypervisor.toml"),
        (MonitorConfig.load, "monitor.toml"),
        (IdsConfig.load, "ids.toml"),
    ]
    for load, name in loaders:
        with pytest.raises(SGMonitorError, match=r"hex"):
            load(d / name)


def test_prometheus_example_passes_promtool(tmp_path: Path) -> None:
    if not PROMTOOL.is_file():
        pytest.fail(f"{PROMTOOL} is missing: run scripts/bootstrap (Debian's prometheus)")
    shutil.copy(EXAMPLES / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ALERT_RULES, tmp_path / "sgmonitor-alerts.yml")
    result = subprocess.run(
        [str(PROMTOOL), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "SUCCESS" in out
    rules = re.search(r"SUCCESS: (\d+) rules found", out)  # the alert rules were loaded
    assert rules is not None and int(rules[1]) > 0, out
    # It scrapes the monitor's metrics endpoint and sends to a local Alertmanager.
    text = (EXAMPLES / "prometheus.yml").read_text()
    metrics = tomllib.loads((EXAMPLES / "monitor.toml").read_text())["metrics"]
    assert f'targets: ["{metrics}"]' in text
    assert 'targets: ["127.0.0.1:9093"]' in text


# --- systemd units ---------------------------------------------------------------------------

PARTIES = {
    "sgmonitor-hypervisor.service": ("hypervisor serve", "hypervisor.toml"),
    "sgmonitor-attestation.service": ("attestation serve", "attestation.toml"),
    "sgmonitor-monitor.service": ("monitor serve", "monitor.toml"),
    "sgmonitor-ids.service": ("ids run", "ids.toml"),
}


def _unit(name: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of a key in order."""
    out: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{name}: not Key=value: {raw!r}"
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("name", sorted(PARTIES))
def test_units_run_their_party_and_may_write_its_files(
    name: str, tmp_path: Path, values: dict[str, bytes]
) -> None:
    command, config = PARTIES[name]
    unit = _unit(name)
    assert unit["Type"] == ["simple"]
    assert unit["ExecStart"] == [
        f"/opt/sgmonitor/venv/bin/sgmonitor {command} --config /etc/sgmonitor/{config}"
    ]
    assert unit["User"][0].startswith("sgmonitor-")
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ConfigurationDirectory": "sgmonitor",
    }.items():
        assert unit[key] == [value], key
    writable = [Path(p.lstrip("-")) for v in unit.get("ReadWritePaths", []) for p in v.split()]
    writable += [Path("/var/lib") / d for d in unit.get("StateDirectory", [])]
    writable += [Path("/var/log") / d for d in unit.get("LogsDirectory", [])]
    writable += [Path("/run") / d for d in unit.get("RuntimeDirectory", [])]

    def may_write(path: Path) -> bool:
        return any(path.is_relative_to(w) for w in writable)

    d = _copy(tmp_path, values)
    if config == "attestation.toml":
        att = AttestationConfig.load(d / config)
        needed = [att.key, att.log]
    elif config == "monitor.toml":
        mon = MonitorConfig.load(d / config)
        needed = [mon.key, mon.log, mon.reports]
    elif config == "hypervisor.toml":
        socket, key, guests, _ = load_config(d / config)
        needed = [key, Path(socket), *(Path(q) for q in guests.values())]  # QMP: connect
    else:
        home = [e for e in unit["Environment"] if e.startswith("SGMONITOR_HOME=")]
        assert len(home) == 1, "ids run needs SGMONITOR_HOME (SIGSTRUCT, platform key)"
        needed = [Path(home[0].partition("=")[2])]
    for path in needed:
        assert path is not None and may_write(path), f"{name} may not write {path}"


def test_an_ids_config_with_a_typo_or_a_bad_mode_is_refused(tmp_path: Path) -> None:
    good = (
        'name = "i"\nvm = "v"\nhypervisor = "/run/hv.sock"\nattestation = "127.0.0.1:1"\n'
        f'verifier_key = "{bytes(32).hex()}"\nmonitor = "127.0.0.1:2"\n'
        f'monitor_key = "{bytes(32).hex()}"\n'
    )
    path = tmp_path / "ids.toml"
    path.write_text(good)
    assert IdsConfig.load(path).name == "i"
    for bad, words in ((good + "intervall = 3\n", "unknown keys"), (good + 'mode = "x"\n', "mode")):
        path.write_text(bad)
        with pytest.raises(SGMonitorError, match=words):
            IdsConfig.load(path)
