"""The ``sgmonitor`` command line."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sgmonitor.errors import GuestDataError, SGMonitorError
from sgmonitor.lab import FLAVORS, LabError

if TYPE_CHECKING:
    from sgmonitor.attestation.policy import Policy

MODES = ("traditional", "secure-plain", "secure")
# Guest data was hostile or inconsistent: the IDS could not check, which is not "clean".
EXIT_COULD_NOT_CHECK = 3
# A party (enclave loader, attestation service, hypervisor service) refused the session.
EXIT_REFUSED = 4
EXIT_USAGE = 2


class UsageError(SGMonitorError):
    """The command's arguments are wrong (exit 2, as argparse's own errors)."""


def _lab_start(args: argparse.Namespace) -> int:
    from sgmonitor.lab import machine
    from sgmonitor.lab.initramfs import Workload

    config = machine.MachineConfig(
        flavor=args.kernel_flavor,
        mem_mib=args.mem,
        paging=args.paging,
        kaslr=not args.no_kaslr,
        pti=args.pti,
        workload=Workload(procs=args.procs, busy=args.busy),
        files=tuple(_added_file(spec) for spec in args.add),
    )
    guest = machine.start(args.name, config)
    print(json.dumps(guest.as_dict()))
    return 0


def _added_file(spec: str) -> tuple[str, str]:
    """``FILE[:GUEST_PATH]`` as (host file, guest path); the default is /root/NAME."""
    host, sep, guest = spec.partition(":")
    if not host:
        raise LabError(f"--add {spec!r}: no file named")
    return (host, guest if sep else f"/root/{Path(host).name}")


def _lab_exec(args: argparse.Namespace) -> int:
    from sgmonitor.lab import machine

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise LabError("no command: sgmonitor lab exec NAME -- CMD [ARGS...]")
    status, output = machine.exec_in_guest(machine.load(args.name), argv, args.timeout)
    sys.stdout.write(output)
    sys.stdout.flush()
    print(f"exit status {status}", file=sys.stderr)
    return status


def _lab_stop(args: argparse.Namespace) -> int:
    from sgmonitor.lab import machine

    names = [g.name for g in machine.running()] if args.all else args.names
    for name in names:
        machine.stop(name)
    return 0


def _lab_list(args: argparse.Namespace) -> int:
    from sgmonitor.lab import machine

    for guest in machine.running():
        print(json.dumps(guest.as_dict()))
    return 0


def _lab_truth(args: argparse.Namespace) -> int:
    from sgmonitor.lab import machine

    truth = machine.truth(machine.load(args.name), fresh=args.fresh)
    if args.symbols:
        print(json.dumps({name: f"{addr:#x}" for name, addr in truth.symbols.items()}))
        return 0
    for proc in truth.processes:
        print(json.dumps(proc))
    return 0


def _lab_kernel(args: argparse.Namespace) -> int:
    from sgmonitor.lab.kernel import fetch_kernel

    print(json.dumps(fetch_kernel(args.kernel_flavor).as_dict()))
    return 0


def _add_lab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="build, boot and stop real Linux guests under QEMU")
    labsub = lab.add_subparsers(dest="lab_command", required=True)

    start = labsub.add_parser("start", help="boot a guest; print its sockets and files as JSON")
    start.add_argument("--name", default="lab")
    start.add_argument("--kernel-flavor", choices=sorted(FLAVORS), default="cloud")
    start.add_argument("--procs", type=int, default=0, help="extra long-lived processes")
    start.add_argument("--busy", action="store_true", help="run a user-space busy loop")
    start.add_argument("--paging", type=int, choices=(4, 5), default=5)
    start.add_argument("--no-kaslr", action="store_true")
    start.add_argument("--pti", action="store_true", help="boot with pti=on")
    start.add_argument("--mem", type=int, default=256, help="guest RAM in MiB")
    start.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="FILE[:GUEST_PATH]",
        help="put FILE into the guest's initramfs (default /root/NAME); repeatable",
    )
    start.set_defaults(func=_lab_start)

    run = labsub.add_parser(
        "exec",
        help="run a command in a running guest (as root); print its output, exit with its status",
        description="Run CMD ARGS in the guest over its command channel, words quoted for "
        "its shell (use 'sh -c LINE' for pipes). Output (stdout and stderr together) is cut "
        "at 64 KiB; the guest kills the command after --timeout seconds (status 143). "
        "Options go before NAME: sgmonitor lab exec --timeout 5 NAME -- CMD ARGS.",
    )
    run.add_argument("name")
    run.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    run.add_argument("argv", nargs="*", metavar="CMD [ARGS...]", help="after a '--'")
    run.set_defaults(func=_lab_exec)

    stop = labsub.add_parser("stop", help="stop guests and remove their RAM files")
    stop.add_argument("names", nargs="*")
    stop.add_argument("--all", action="store_true")
    stop.set_defaults(func=_lab_stop)

    labsub.add_parser("list", help="running lab guests, one JSON object a line").set_defaults(
        func=_lab_list
    )

    truth = labsub.add_parser("truth", help="the guest's own process list as JSON Lines")
    truth.add_argument("name")
    truth.add_argument("--fresh", action="store_true", help="ask the guest for a new listing")
    truth.add_argument("--symbols", action="store_true", help="print its kallsyms addresses")
    truth.set_defaults(func=_lab_truth)

    kernel = labsub.add_parser("kernel", help="download (once) and unpack a Debian kernel")
    kernel.add_argument("--kernel-flavor", choices=sorted(FLAVORS), default="cloud")
    kernel.set_defaults(func=_lab_kernel)


def _print_processes(records: list[dict[str, object]], as_json: bool) -> None:
    if as_json:
        for record in records:
            print(json.dumps(record))
        return
    print(f"{'PID':>7} {'TGID':>7} {'PPID':>7} {'UID':>6} S COMMAND")
    for r in records:
        print(f"{r['pid']:>7} {r['tgid']:>7} {r['ppid']:>7} {r['uid']:>6} {r['state']} {r['name']}")


def _say(message: str) -> None:
    print(f"sgmonitor: {message}", file=sys.stderr, flush=True)


def _policy(args: argparse.Namespace) -> Policy | None:
    """The operator's ``--policy`` file, or None for the installed enclave's pins."""
    from sgmonitor.attestation.policy import Policy

    return Policy.load(args.policy) if args.policy else None


def _add_policy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="attestation policy (TOML: mrenclave, mrsigner, min_isv_svn, allow_debug) for "
        "the private attestation service; default: pin the installed enclave",
    )


def _secure_report(args: argparse.Namespace, mode: str, check: str) -> dict[str, Any]:
    """``check`` run through a local deployment: the report as the monitor opened it."""
    if not args.qemu or args.ram:
        raise SGMonitorError("--core, --raw and --ram are read in this process: --mode traditional")
    if args.vmlinux or args.system_map or args.btf_sha256:
        raise SGMonitorError(
            "--vmlinux, --system-map and --btf-sha256 apply to --mode traditional only"
        )
    from sgmonitor.local import scan_qemu

    return scan_qemu(
        args.qemu,
        mode=mode,
        check=check,
        cache_budget=args.cache_budget << 20,
        policy=_policy(args),
        say=_say,
    )


@contextlib.contextmanager
def _traditional_kernel(args: argparse.Namespace) -> Iterator[Any]:
    """The guest kernel read in this process, from a live guest (held paused), an ELF
    core or a raw image."""
    from sgmonitor.traditional import open_guest_kernel

    options = {
        "vendor_vmlinux": args.vmlinux,
        "system_map": args.system_map,
        "btf_sha256": args.btf_sha256,
    }
    if args.core or args.raw:
        from sgmonitor.guest.elfcore import ElfCore
        from sgmonitor.guest.memory import RawImage, Registers

        # CR0.PG: a raw image of a running 64-bit kernel has paging on.
        registers = Registers(cr0=1 << 31, cr3=args.cr3 or 0, cr4=args.cr4 or 0)
        with ElfCore(args.core) if args.core else RawImage(args.raw, registers) as dump:
            yield open_guest_kernel(dump, **options)
    else:
        from sgmonitor.guest.qemu import QemuGuest

        with QemuGuest(args.qemu, args.ram) as live, live.paused():
            yield open_guest_kernel(live, **options)


def _mode(args: argparse.Namespace) -> str:
    if (args.cr3 is None) != (args.raw is None) or (args.cr4 is None) != (args.raw is None):
        raise SGMonitorError("--raw needs --cr3 and --cr4 (from 'info registers'), and only it")
    return str(args.mode or ("secure" if args.qemu else "traditional"))


def _ps(args: argparse.Namespace) -> int:
    mode = _mode(args)
    if mode != "traditional":
        records = _secure_report(args, mode, "pslist")["records"]
        _print_processes([dict(r) for r in records], args.json)
        return 0
    from sgmonitor.ids.pslist import list_processes

    with _traditional_kernel(args) as kernel:
        found = list_processes(kernel)
    _print_processes([dict(r.as_dict()) for r in found], args.json)
    return 0


def _check(args: argparse.Namespace) -> int:
    from sgmonitor.ids.registry import registered, run_checks

    mode = _mode(args)
    names = [n for n in (args.only or "").split(",") if n]
    unknown = sorted(set(names) - set(registered()))
    if unknown:
        raise UsageError(f"unknown checks {unknown}; known: {list(registered())}")
    if "kernel_text" in (names or registered()) and args.vmlinux is None:
        _say(
            "kernel_text: no --vmlinux, so the text is compared with a baseline taken now, "
            "which one run cannot find changed: give the vendor image (traditional mode), "
            "or run the checks continuously ('sgmonitor ids run')"
        )
    if mode != "traditional":
        findings = _secure_report(args, mode, ",".join(names) or "all")["findings"]
    else:
        with _traditional_kernel(args) as kernel:
            findings = [f.as_dict() for f in run_checks(kernel, names)]
    for finding in findings:
        if args.json:
            print(json.dumps(finding))
        else:
            where = " ".join(
                f"{k}={finding[k]:#x}" if k == "address" else f"{k}={finding[k]}"
                for k in ("pid", "module", "symbol", "address")
                if k in finding
            )
            print(
                f"{finding['severity'].upper():8} {finding['check']}: {finding['summary']} {where}"
            )
    return 1 if findings else 0


def _vendor_vmlinux(path: str) -> Path:
    """A vmlinux ELF file as given, or the one inside a vmlinuz (bzImage), unpacked to a
    file that lives as long as this process."""
    import atexit
    import tempfile

    from sgmonitor.lab.kernel import extract_vmlinux

    given = Path(path)
    try:
        image = given.read_bytes()
        if image[:4] == b"\x7fELF":
            return given
        vmlinux = extract_vmlinux(image)
    except (OSError, LabError) as exc:
        why = f"{path}: neither a vmlinux nor a vmlinuz ({exc})"
        raise argparse.ArgumentTypeError(why) from None
    fd, unpacked = tempfile.mkstemp(prefix="sgmonitor-vmlinux-")
    atexit.register(os.unlink, unpacked)
    with os.fdopen(fd, "wb") as out:
        out.write(vmlinux)
    return Path(unpacked)


def _add_guest_source(parser: argparse.ArgumentParser, default_mode: str) -> None:
    """The options ``ps`` and ``check`` share: where the guest is, which path reads it."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--qemu", metavar="QMP_SOCKET", help="a running QEMU guest's QMP socket")
    source.add_argument("--core", metavar="FILE", help="an ELF core from dump-guest-memory")
    source.add_argument(
        "--raw", metavar="FILE", help="a raw RAM image (QEMU layout), with --cr3 and --cr4"
    )
    parser.add_argument("--cr3", type=lambda v: int(v, 16), metavar="HEX", help="for --raw")
    parser.add_argument("--cr4", type=lambda v: int(v, 16), metavar="HEX", help="for --raw")
    parser.add_argument(
        "--mode",
        choices=("secure", "secure-plain", "traditional"),
        help=default_mode,
    )
    parser.add_argument(
        "--cache-budget", type=int, default=32, metavar="MIB", help="enclave page cache (MiB)"
    )
    parser.add_argument("--ram", metavar="FILE", help="the guest RAM file (default: ask QMP)")
    parser.add_argument("--json", action="store_true", help="JSON Lines instead of a table")
    parser.add_argument(
        "--vmlinux",
        type=_vendor_vmlinux,
        metavar="FILE",
        help="the vendor's vmlinux, or the vmlinuz the guest booted: refuse a guest whose "
        "BTF differs, and compare its kernel text with it (check kernel_text)",
    )
    parser.add_argument("--system-map", type=Path, help="System.map to take symbols from")
    parser.add_argument("--btf-sha256", metavar="HEX", help="refuse a guest whose BTF hash differs")
    _add_policy(parser)


def _add_ps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ps = sub.add_parser(
        "ps",
        help="list a guest's processes from outside the VM",
        description="List the guest's processes by reading its kernel memory. Needs no "
        "debug files: symbols and types come from the guest itself.",
    )
    _add_guest_source(
        ps,
        "secure (default for --qemu): enclave + hypervisor service, sealed pages; "
        "secure-plain: the same path UNSEALED, for experiments only; traditional: read "
        "guest RAM in this process (default for --core and --raw)",
    )
    ps.set_defaults(func=_ps)


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser(
        "check",
        help="run the IDS checks once: exit 0 nothing found, 1 findings, 3 could not check",
        description="Run the registered checks (sgmonitor/ids/checks/) over the guest. "
        "Exit 0: nothing found; 1: findings; 3: could not check the guest.",
    )
    _add_guest_source(check, "secure (default for --qemu) or traditional (see ps)")
    check.add_argument("--only", metavar="NAME,...", help="these checks only (default: all)")
    check.set_defaults(func=_check)


def _bench(args: argparse.Namespace) -> int:
    from sgmonitor import bench

    def progress(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    budgets = [b << 20 for b in args.budgets]
    if args.runs < 1:
        raise SystemExit("bench: --runs must be at least 1")
    if args.qemu:
        if args.processes:
            raise SystemExit("bench: --processes boots lab guests; --qemu measures one guest")
        results = bench.run_on_guest(
            args.qemu, args.modes, budgets, args.runs, progress, _policy(args)
        )
    else:
        results = bench.run_benchmark(
            args.processes or [166, 1000], args.modes, budgets, args.runs, progress, _policy(args)
        )
    if args.json:
        print(json.dumps({"runs": [r.as_dict() for r in results]}, indent=2))
    else:
        print(bench.table(results))
        print()
        print(bench.breakdown(results))
    sys.stdout.flush()  # the numbers are out even if plotting fails
    if args.plot:
        bench.plot(results, args.plot)
    return 0 if all(r.records_match_truth for r in results) else 1


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench",
        help="the paper's Figure 9/10: scan time of each mode on lab guests, in one run",
        description="Boot a lab guest per process count and time the process-list scan in "
        "each mode on it. Default: Figure 9 (~166 and ~1,000 processes, 10 runs each). "
        "Figure 10: --processes 100 500 1000 2000 5000 --modes traditional secure "
        "--budgets 32 1 --plot fig10.png. With --qemu SOCK: the same on an existing guest. "
        "Every run's list is compared with the lab guest's own listing, or on an existing "
        "guest with the first traditional scan's (the JSON's 'truth' says which); exit 1 "
        "if any differs.",
    )
    bench.add_argument(
        "--processes",
        type=int,
        nargs="+",
        help="lab guests of these sizes (default: 166 1000)",
    )
    bench.add_argument(
        "--qemu",
        metavar="QMP_SOCKET",
        help="measure this running guest instead (its RAM a shared memory-backend-file); "
        "it is stopped during the measurement and left as it was",
    )
    bench.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    bench.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[32],
        metavar="MIB",
        help="enclave page-cache budgets to run the secure modes with (MiB)",
    )
    bench.add_argument(
        "--runs",
        type=int,
        default=10,
        help="timed scans of each mode, taken in turns over up to 5 rounds (default 10)",
    )
    bench.add_argument("--json", action="store_true", help="one JSON document: {runs: [...]}")
    bench.add_argument("--plot", metavar="PNG", help="also draw time against process count")
    _add_policy(bench)
    bench.set_defaults(func=_bench)


def _enclave_measure(args: argparse.Namespace) -> int:
    from sgmonitor.tee.boot import measure_installed

    measurement = measure_installed()
    if args.json:
        doc: dict[str, object] = {"mrenclave": measurement.mrenclave.hex()}
        if args.manifest:
            doc["manifest"] = measurement.manifest
        print(json.dumps(doc))
    else:
        print(measurement.manifest if args.manifest else measurement.mrenclave.hex())
    return 0


def _enclave_sign(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sgmonitor import installed
    from sgmonitor.keyfiles import load_or_create
    from sgmonitor.tee import backend_class, sign_enclave_for
    from sgmonitor.tee.boot import measure_installed

    key_path = args.key or installed.signer_key_path()
    key, made = load_or_create(key_path, Ed25519PrivateKey)
    if made:
        _say(f"made a signing key: {key_path}")
    mrenclave = measure_installed().mrenclave
    sigstruct = sign_enclave_for(
        args.backend, key, mrenclave=mrenclave, isv_svn=args.isv_svn, debug=args.debug
    )
    out = args.out or installed.sigstruct_path()
    out.write_bytes(sigstruct)
    signed = backend_class(args.backend).signed_identity(sigstruct)
    print(
        json.dumps(
            {
                "sigstruct": str(out),
                "mrenclave": signed.mrenclave.hex(),
                "mrsigner": signed.mrsigner.hex(),
                "isv_svn": signed.isv_svn,
                "debug": signed.debug,
            }
        )
    )
    return 0


def _enclave_platform(args: argparse.Namespace) -> int:
    from sgmonitor import installed
    from sgmonitor.tee.launch_config import raw_ed25519

    print(raw_ed25519(installed.platform_public_key()).hex())
    return 0


def _add_enclave(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enclave = sub.add_parser("enclave", help="the installed enclave: measure, sign, platform")
    esub = enclave.add_subparsers(dest="enclave_command", required=True)
    measure = esub.add_parser(
        "measure",
        help="the installed enclave's code measurement (MRENCLAVE): the value a policy pins",
    )
    measure.add_argument("--json", action="store_true")
    measure.add_argument("--manifest", action="store_true", help="what the measurement covers")
    measure.set_defaults(func=_enclave_measure)
    sign = esub.add_parser("sign", help="sign the installed enclave's measurement (SIGSTRUCT)")
    sign.add_argument("--key", type=Path, help="Ed25519 signer key (made if missing)")
    sign.add_argument("--out", type=Path, help="where to write the SIGSTRUCT")
    sign.add_argument("--isv-svn", type=int, default=1, help="security version number")
    sign.add_argument("--debug", action="store_true", help="sign as a debug enclave")
    sign.add_argument("--backend", default="sim")
    sign.set_defaults(func=_enclave_sign)
    platform = esub.add_parser(
        "platform", help="the simulated platform's quoting key, for a verifier to trust"
    )
    platform.set_defaults(func=_enclave_platform)


def _service(module: str) -> Callable[[argparse.Namespace], int]:
    """A party's own command line (its module's ``main``), imported only when run."""

    def run(args: argparse.Namespace) -> int:
        main: Callable[[list[str]], int] = importlib.import_module(module).main
        return main(args.rest)

    return run


def _add_services(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, module, what in (
        ("attestation", "sgmonitor.attestation.__main__", "the attestation service: 'serve'"),
        (
            "hypervisor",
            "sgmonitor.hypervisor.__main__",
            "the hypervisor service: keygen, serve, revoke",
        ),
        ("monitor", "sgmonitor.monitor.__main__", "the remote monitor: 'serve --config FILE'"),
        ("ids", "sgmonitor.untrusted.ids_run", "the IDS on a schedule: 'run --config FILE'"),
    ):
        parser = sub.add_parser(name, help=what, add_help=False)
        parser.add_argument("rest", nargs=argparse.REMAINDER)
        parser.set_defaults(func=_service(module))


def _demo(args: argparse.Namespace) -> int:
    from sgmonitor.demo import print_table, run_demo

    doc = run_demo(args.qemu, interval=args.interval, say=_say, policy=_policy(args))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole system in one command: every party, a scan, heartbeats, a failure",
        description="Start every party as its own process (hypervisor service, attestation "
        "service, remote monitor, the IDS), list the guest's processes as the monitor "
        "received them, show heartbeats, stop the IDS and time its detection, stop all.",
    )
    demo.add_argument("--qemu", metavar="QMP_SOCKET", help="a guest of yours (default: lab)")
    demo.add_argument("--json", action="store_true", help="one JSON document on stdout")
    demo.add_argument(
        "--interval", type=float, default=0.5, help="heartbeat interval, seconds (>= 0.1)"
    )
    _add_policy(demo)
    demo.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgmonitor", description="Secure VM introspection from a TEE"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_lab(sub)
    _add_ps(sub)
    _add_check(sub)
    _add_bench(sub)
    _add_enclave(sub)
    _add_services(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # A party's own options go to its command line whole: argparse's REMAINDER does not
    # take a leading option ("sgmonitor monitor --help"), so those come back as extras.
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "rest"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.rest = [*extra, *args.rest]
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:  # e.g. piped into head: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except GuestDataError as exc:
        print(f"sgmonitor: could not check the guest: {exc}", file=sys.stderr)
        return EXIT_COULD_NOT_CHECK
    except UsageError as exc:
        print(f"sgmonitor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (LabError, SGMonitorError) as exc:
        if _refused(exc):
            print(f"sgmonitor: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        print(f"sgmonitor: error: {exc}", file=sys.stderr)
        return 1


def _refused(exc: Exception) -> bool:
    """Whether a party refused the session. Only the secure path, which imports the
    untrusted library, can raise that: a traditional ``ps`` need not import it."""
    library = sys.modules.get("sgmonitor.untrusted.library")
    return library is not None and isinstance(exc, library.AttestationRefused)


if __name__ == "__main__":
    sys.exit(main())
