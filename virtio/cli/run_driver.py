"""``virtio run-driver``: run your own guest virtio driver against the project's devices.

PROGRAM is a C file (built with the freestanding runtime and ``guest-drivers/include``:
``#include <pyvirtio.h>``) or an ELF; ``template`` runs the device's template driver.
The device runs in strict mode: every spec violation the device sees is a driver
error naming its clause.  See docs/driver-toolkit.md.

Exit status: 0 if the program returned 0 and no driver error was raised, 1 otherwise,
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    from emulator.drvkit.devices import DEVICES
    from emulator.drvkit.inject import KINDS
    from emulator.drvkit.timing import MODES

    p = subparsers.add_parser(
        "run-driver",
        help="run a guest driver program against a device in the emulator (strict checks,"
        " timing, fault injection, traces)",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "program", nargs="?", help="a .c file, an ELF, or 'template' (not with --restore)"
    )
    p.add_argument(
        "--device",
        choices=sorted(DEVICES),
        default="blk",
        help="blk (8 MiB disk), net (a peer echoes frames), input (a keyboard that types), rng",
    )
    p.add_argument(
        "--transport",
        choices=["mmio", "pci"],
        default="mmio",
        help="virtio-mmio (default) or virtio-pci (a function on bus 0; its BAR 0, INTx line"
        " and bus/device/function are in the parameters)",
    )
    p.add_argument("--cpu", choices=["kvm", "soft", "auto"], default="auto")
    p.add_argument("--disk", metavar="IMAGE", help="raw disk image (blk; default: 8 MiB in memory)")
    p.add_argument("--timing", choices=MODES, default="inline", help="device timing model")
    p.add_argument("--seed", type=int, default=0, help="seed of the timing model")
    p.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"KIND[=N][@req=N|@exit=N|@pkt=N], KIND one of {', '.join(KINDS)} (repeatable)",
    )
    p.add_argument("--trace", metavar="FILE", help="write a trace (and FILE.json for Perfetto)")
    p.add_argument(
        "--arg", action="append", type=lambda s: int(s, 0), default=[], metavar="N",
        help="an integer for the program's args[] (repeatable, in order)",
    )  # fmt: skip
    p.add_argument(
        "--no-strict", action="store_true", help="device-type MUSTs answered by a status only"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument(
        "--save-at",
        nargs=2,
        metavar=("N", "FILE"),
        help="save the running VM after exit N (the first write exit from N on) to FILE,"
        " then carry on",
    )
    p.add_argument(
        "--restore",
        metavar="FILE",
        help="restore a VM saved with --save-at (on --cpu) and carry on; the device,"
        " timing, seed and injections are the snapshot's",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emulator.drvkit import RunDriverError, run_driver
    from emulator.drvkit.inject import InjectSpecError
    from emulator.drvkit.session import template_path
    from emulator.guest_build import GuestBuildError
    from emulator.snapshot import SnapshotError

    if (args.program is None) == (args.restore is None):
        print("virtio run-driver: give PROGRAM or --restore FILE (one of them)", file=sys.stderr)
        return 2
    program = template_path(args.device) if args.program == "template" else args.program
    try:
        save_at = int(args.save_at[0]) if args.save_at else None
    except ValueError:
        print(
            f"virtio run-driver: --save-at N: {args.save_at[0]!r} is not a number", file=sys.stderr
        )
        return 2
    try:
        res = run_driver(
            program,
            args.device,
            transport=args.transport,
            cpu=args.cpu,
            disk=args.disk,
            timing=args.timing,
            seed=args.seed,
            inject=args.inject,
            trace=args.trace,
            strict=not args.no_strict,
            args=args.arg,
            timeout=args.timeout,
            save_at=save_at,
            save_to=args.save_at[1] if args.save_at else None,
            restore=args.restore,
        )
    except (RunDriverError, InjectSpecError, GuestBuildError, SnapshotError) as exc:
        print(f"virtio run-driver: {exc}", file=sys.stderr)
        return 2
    d = res.as_dict()
    if save_at is not None and d["saved_at_exit"] is None:
        print(
            f"virtio run-driver: nothing saved: the run ended at exit {d['exits_total']},"
            f" before a write exit numbered {save_at} or more",
            file=sys.stderr,
        )
    if args.json:
        print(res.to_json())
        return res.exit_status
    sys.stdout.write(d["output"])
    for e in d["driver_errors"]:
        where = f" at {e['register']} ({e['access']})" if "register" in e else ""
        rip = f" rip={e['rip']}" if "rip" in e else ""
        print(f"driver error §{e['clause']} {e['class']}{where}{rip}: {e['message']}")
        if e["label"]:
            print(f"    [{e['label']}]")
    for inj in d["injections"]:
        print(f"injected {inj['inject']} at exit {inj['exit']}: {inj['note']}")
    status = "|".join(d["device_status"]["names"]) or "0"
    outcome = d["halt"] or f"result {d['result']} ({d['result_name']})"
    print(
        f"{'PASS' if res.success else 'FAIL'}: {outcome}; {len(d['driver_errors'])} driver"
        f" error(s); device status {status}; {d['requests_served']} requests;"
        f" {d['exits_total']} exits on {d['cpu']}; timing {d['timing']} seed {d['seed']}"
    )
    return res.exit_status
