"""The ``sgmonitor`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from sgmonitor.errors import SGMonitorError
from sgmonitor.lab.kernel import FLAVORS, LabError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgmonitor", description="Secure VM introspection from a TEE"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_lab(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (LabError, SGMonitorError) as exc:
        print(f"sgmonitor: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
