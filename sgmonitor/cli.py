"""The ``sgmonitor`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sgmonitor.errors import GuestDataError, SGMonitorError
from sgmonitor.lab.kernel import FLAVORS, LabError

# Guest data was hostile or inconsistent: the IDS could not check, which is not "clean".
EXIT_COULD_NOT_CHECK = 3


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
    )
    guest = machine.start(args.name, config)
    print(json.dumps(guest.as_dict()))
    return 0


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
    start.set_defaults(func=_lab_start)

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


def _ps(args: argparse.Namespace) -> int:
    from sgmonitor.ids.pslist import list_processes

    options = {
        "vendor_vmlinux": args.vmlinux,
        "system_map": args.system_map,
        "btf_sha256": args.btf_sha256,
    }
    if args.core:
        from sgmonitor.guest.elfcore import ElfCore
        from sgmonitor.traditional import open_guest_kernel

        with ElfCore(args.core) as core:
            records = list_processes(open_guest_kernel(core, **options))
    else:
        from sgmonitor.guest.qemu import QemuGuest
        from sgmonitor.traditional import open_guest_kernel

        with QemuGuest(args.qemu, args.ram) as live, live.paused():
            records = list_processes(open_guest_kernel(live, **options))
    _print_processes([r.as_dict() for r in records], args.json)
    return 0


def _add_ps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ps = sub.add_parser(
        "ps",
        help="list a guest's processes from outside the VM",
        description="List the guest's processes by reading its kernel memory. Needs no "
        "debug files: symbols and types come from the guest itself.",
    )
    source = ps.add_mutually_exclusive_group(required=True)
    source.add_argument("--qemu", metavar="QMP_SOCKET", help="a running QEMU guest's QMP socket")
    source.add_argument("--core", metavar="FILE", help="an ELF core from dump-guest-memory")
    ps.add_argument("--ram", metavar="FILE", help="the guest RAM file (default: ask QMP)")
    ps.add_argument("--json", action="store_true", help="JSON Lines instead of a table")
    ps.add_argument("--vmlinux", type=Path, help="vendor vmlinux: refuse a guest whose BTF differs")
    ps.add_argument("--system-map", type=Path, help="System.map to take symbols from")
    ps.add_argument("--btf-sha256", metavar="HEX", help="refuse a guest whose BTF hash differs")
    ps.set_defaults(func=_ps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgmonitor", description="Secure VM introspection from a TEE"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_lab(sub)
    _add_ps(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:  # e.g. piped into head: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except GuestDataError as exc:
        print(f"sgmonitor: could not check the guest: {exc}", file=sys.stderr)
        return EXIT_COULD_NOT_CHECK
    except (LabError, SGMonitorError) as exc:
        print(f"sgmonitor: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
