"""The registry of IDS checks: each check is one small module that an IDS author can read
in a minute, in ``sgmonitor/ids/checks/``, registered by its ``@check`` decorator.

A check is a function ``(kernel) -> Iterable[Finding]``: it reads guest kernel objects
with the validating helpers and yields what it found. Guest data that makes no sense
raises ``GuestDataError`` ("could not check"), never an empty, clean-looking result.
The enclave, the CLI, the bench and the library find checks by name here; adding a
check means adding one module, and no edit anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SEVERITIES", "Check", "Finding", "check", "registered", "run_checks"]

SEVERITIES = ("info", "low", "medium", "high", "critical")


@dataclass(frozen=True)
class Finding:
    """What a check found, with the evidence an operator needs to act on it."""

    check: str
    severity: str
    summary: str
    pid: int | None = None
    module: str | None = None
    symbol: str | None = None
    address: int | None = None
    expected: str | None = None
    found: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}")

    def as_dict(self) -> dict[str, Any]:
        """The finding as JSON wants it: evidence that is absent is left out."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Check:
    """One registered check."""

    name: str
    description: str
    run: Callable[[Any], Iterable[Finding]] = field(repr=False)


_REGISTRY: dict[str, Check] = {}


def check(name: str, description: str) -> Callable[[Callable[[Any], Iterable[Finding]]], Any]:
    """Register the decorated ``run(kernel)`` as check ``name``."""

    def register(run: Callable[[Any], Iterable[Finding]]) -> Callable[[Any], Iterable[Finding]]:
        if name in _REGISTRY:
            raise ValueError(f"check {name!r} is registered twice")
        _REGISTRY[name] = Check(name, description, run)
        return run

    return register


def registered(*, discover: bool = True) -> dict[str, Check]:
    """Every check by name. ``discover`` imports each module of ``sgmonitor.ids.checks``
    first; the enclave passes False, because its measured launch imported them all and
    it must not read the disk again."""
    if discover:
        from sgmonitor.ids import checks

        for info in pkgutil.iter_modules(checks.__path__):
            importlib.import_module(f"{checks.__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def run_checks(
    kernel: Any, names: Sequence[str] | None = None, *, discover: bool = True
) -> list[Finding]:
    """Run the named checks (all without names) over ``kernel``; their findings.

    :raises KeyError: an unknown check name
    :raises GuestDataError: a check could not read the guest (could not check)
    """
    checks = registered(discover=discover)
    chosen = list(checks) if not names else list(names)
    unknown = [n for n in chosen if n not in checks]
    if unknown:
        raise KeyError(f"unknown checks {unknown}; known: {list(checks)}")
    return [finding for name in chosen for finding in checks[name].run(kernel)]
