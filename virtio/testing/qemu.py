"""Boot a throw-away QEMU guest and run shell commands in it (trio).

The guest is the kernel + busybox initramfs of :mod:`virtio.testing.guest_image`.
Its ``/init`` loads the virtio drivers, then either

- runs one **script** handed over through fw_cfg (``opt/pyvirtio/script``) and
  powers off (``QemuGuest(..., script=...)`` + :meth:`QemuGuest.wait_script`, or
  :func:`run_guest_script`), or
- becomes an **interactive** shell on the serial port: :meth:`QemuGuest.run`
  sends one command at a time (base64, in lines of at most :data:`LINE_CHUNK`
  characters) and collects its output and exit status between per-command markers.
  The guest's tty is in canonical mode, so its shell reads whole lines only (see
  the protocol notes in :mod:`virtio.testing.guest_image`).

Example::

    from virtio.testing.guest_image import ensure_image
    from virtio.testing.qemu import QemuGuest, VhostUserBlk

    image = ensure_image()
    async with QemuGuest(image, devices=[VhostUserBlk("/tmp/x/blk.sock", num_queues=2)]) as g:
        r = await g.run("cat /sys/block/vda/size")
        print(r.rc, r.output)

Interactive commands are *sourced* by one persistent shell (like typing in a
terminal): ``cd``, variables and background jobs (``cmd &`` then later
``wait $pid``) carry over from one :meth:`~QemuGuest.run` to the next.  So do not
``exit`` (the shell is PID 1: the guest dies) nor leave ``set -e`` on.  Each
command's stdin is /dev/null.  For long background I/O use :meth:`QemuGuest.spawn`.

After a command timed out, the shell is still busy with it: the guest is then
marked broken and further ``run`` calls fail at once (shut it down).  Every error
(:class:`GuestTimeout`, :class:`GuestExited`, :class:`GuestCommandError`) carries
the tail of the console and of QEMU's stderr in its message.

In the guest: busybox (sh, dd, taskset, ...), ``mkfs.ext4``/``e2fsck`` (real
e2fsprogs), ``fio`` when booted with ``fio=True``, kernel modules for virtio
pci/mmio/blk/net/input/console/scsi/balloon/rng/vsock/fs, ext4, ata_piix, sd_mod,
evdev, all loaded at boot; devtmpfs on /dev, /tmp on the initramfs (RAM).
Boot to the shell takes ~3.5 s under TCG (~5.5 s with ``fio=True``).

Hot-plug: ``QemuGuest(..., qmp=True)``, then ``dev_id = await g.hotplug(VhostUserBlk(sock))``
and ``await g.unplug(dev_id)``; :attr:`QemuGuest.qmp` runs any other QMP command.

Notes on QEMU 7.2:

- Guest RAM is a shared memfd (``memory-backend-memfd,share=on`` + ``-numa``), as
  vhost-user needs.
- Under TCG, QEMU 7.2 crashes with vhost-user-net unless ``virtio-net-pci`` has
  ``vectors=0``: :class:`VhostUserNet` sets that by default when ``accel`` is tcg.
- ``-nodefaults``: no default NIC (no user-mode networking), no VGA, no monitor;
  the serial port is QEMU's stdio (``-display none`` does what ``-nographic`` would).
- These CI machines' /dev/kvm cannot boot Linux: the default accelerator is
  ``tcg``; pass ``accel="kvm"`` (or set ``PYVIRTIO_QEMU_ACCEL=kvm``) where it works.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import trio

from virtio.testing.guest_image import GuestImage

__all__ = [
    "QEMU_VERSIONS",
    "Disk",
    "GuestCommandError",
    "GuestError",
    "GuestExited",
    "GuestJob",
    "GuestResult",
    "GuestTimeout",
    "QemuBinary",
    "QemuError",
    "QemuGuest",
    "QemuUnavailable",
    "QmpClient",
    "QmpError",
    "VhostUserBlk",
    "VhostUserInput",
    "VhostUserNet",
    "VhostUserRng",
    "check_prerequisites",
    "command_lines",
    "default_accel",
    "find_qemu",
    "qemu_binary",
    "run_guest_script",
]

QEMU_BINARY = "qemu-system-x86_64"
CONSOLE_TAIL = 4000
LINE_CHUNK = 1024
"""Base64 characters per command line: well under the 4095 characters a canonical-mode
tty line holds in the guest."""


# --------------------------------------------------------------------------- errors


class QemuError(RuntimeError):
    """Base class of the harness errors."""


class QemuUnavailable(QemuError):
    """QEMU (or the guest image) is absent: callers may turn this into pytest.skip."""


class GuestError(QemuError):
    """The guest misbehaved; the message ends with QEMU's stderr and the console tail."""

    def __init__(self, message: str, *, console: str = "", stderr: str = "") -> None:
        self.console_tail = console
        self.stderr_tail = stderr
        parts = [message]
        if stderr.strip():
            parts.append("--- qemu stderr (tail) ---\n" + stderr.rstrip())
        if console.strip():
            parts.append("--- guest console (tail) ---\n" + console.rstrip())
        super().__init__("\n".join(parts))


class GuestTimeout(GuestError, TimeoutError):
    """The guest did not answer in time."""


class GuestExited(GuestError):
    """QEMU exited (guest crashed, powered off, or QEMU refused its arguments)."""


class GuestCommandError(GuestError):
    """A command run with ``check=True`` exited non-zero (``.result`` has it all)."""

    def __init__(self, result: GuestResult) -> None:
        self.result = result
        super().__init__(
            f"guest command exited {result.rc}: {result.command!r}\n"
            f"--- output ---\n{result.output.rstrip()}"
        )


class QmpError(QemuError):
    """A QMP command returned an error (``.error`` is QEMU's error object)."""

    def __init__(self, command: str, error: Mapping[str, Any]) -> None:
        self.command = command
        self.error = dict(error)
        super().__init__(f"QMP {command}: {error.get('class')}: {error.get('desc')}")


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """One command's (or script's) exit status and console output."""

    command: str
    rc: int
    raw: bytes
    seconds: float

    @property
    def output(self) -> str:
        """Output as text (\\r\\n -> \\n, undecodable bytes replaced)."""
        return self.raw.decode(errors="replace").replace("\r\n", "\n")

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self) -> Self:
        if self.rc != 0:
            raise GuestCommandError(self)
        return self


# --------------------------------------------------------------------------- devices


class Device:
    """Something that adds arguments to the QEMU command line."""

    def qemu_args(self, index: int, *, accel: str) -> list[str]:
        raise NotImplementedError

    def hotplug_commands(self, index: int) -> list[tuple[str, dict[str, Any]]]:
        """QMP commands that hot-plug this device; the ``device_add`` one comes last."""
        raise NotImplementedError(f"{type(self).__name__} does not support hot-plug")

    def device_id(self, index: int) -> str:
        raise NotImplementedError


def _props(props: Mapping[str, object]) -> str:
    out = []
    for k, v in props.items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = "on" if v else "off"
        out.append(f",{k}={v}")
    return "".join(out)


@dataclasses.dataclass
class VhostUserBlk(Device):
    """``vhost-user-blk-pci`` on a backend listening at ``socket``.

    ``reconnect``: seconds between QEMU's reconnection attempts after the backend
    went away (None: no reconnection; the device is dead once the backend dies).
    ``props``: more ``-device`` properties (``queue-size``, ``config-wce``, ...).
    """

    socket: str | os.PathLike[str]
    num_queues: int = 1
    reconnect: int | None = None
    props: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def device_id(self, index: int) -> str:
        return f"blk{index}"

    def hotplug_commands(self, index: int) -> list[tuple[str, dict[str, Any]]]:
        chardev: dict[str, Any] = {
            "addr": {"type": "unix", "data": {"path": os.fspath(self.socket)}},
            "server": False,
        }
        if self.reconnect is not None:
            chardev["reconnect"] = self.reconnect
        device = {
            "driver": "vhost-user-blk-pci",
            "id": self.device_id(index),
            "chardev": f"vublk{index}",
            "num-queues": self.num_queues,
            **self.props,
        }
        return [
            (
                "chardev-add",
                {"id": f"vublk{index}", "backend": {"type": "socket", "data": chardev}},
            ),
            ("device_add", device),
        ]

    def qemu_args(self, index: int, *, accel: str) -> list[str]:
        chardev = f"socket,id=vublk{index},path={os.fspath(self.socket)}"
        if self.reconnect is not None:
            chardev += f",reconnect={self.reconnect}"
        device = f"vhost-user-blk-pci,id={self.device_id(index)},chardev=vublk{index}"
        device += f",num-queues={self.num_queues}" + _props(self.props)
        return ["-chardev", chardev, "-device", device]


@dataclasses.dataclass
class VhostUserNet(Device):
    """``virtio-net-pci`` with a ``vhost-user`` netdev on ``socket``.

    ``vectors`` defaults to 0 under TCG: QEMU 7.2 crashes otherwise (MSI-X with
    vhost-user-net under TCG).
    """

    socket: str | os.PathLike[str]
    queues: int = 1
    reconnect: int | None = None
    vectors: int | None = None
    mac: str | None = None
    props: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def qemu_args(self, index: int, *, accel: str) -> list[str]:
        chardev = f"socket,id=vunet{index},path={os.fspath(self.socket)}"
        if self.reconnect is not None:
            chardev += f",reconnect={self.reconnect}"
        netdev = f"vhost-user,id=net{index},chardev=vunet{index},queues={self.queues}"
        vectors = self.vectors
        if vectors is None and accel.startswith("tcg"):
            vectors = 0
        device = f"virtio-net-pci,id=nic{index},netdev=net{index}"
        props: dict[str, object] = {"vectors": vectors, "mac": self.mac}
        if self.queues > 1:
            props["mq"] = True
        device += _props({**props, **self.props})
        return ["-chardev", chardev, "-netdev", netdev, "-device", device]


@dataclasses.dataclass
class VhostUserRng(Device):
    """``vhost-user-rng-pci`` on a back-end listening at ``socket`` (QEMU 7.2 starts it
    under TCG)."""

    socket: str | os.PathLike[str]

    def qemu_args(self, index: int, *, accel: str) -> list[str]:
        chardev = f"socket,id=vurng{index},path={os.fspath(self.socket)}"
        device = f"vhost-user-rng-pci,id=rng{index},chardev=vurng{index}"
        return ["-chardev", chardev, "-device", device]


@dataclasses.dataclass
class VhostUserInput(Device):
    """``vhost-user-input-pci`` on a back-end at ``socket`` (QEMU 10.0 runs it under
    TCG; QEMU 7.2 refuses it without KVM: "vhost initialization failed: requires kvm")."""

    socket: str | os.PathLike[str]

    def qemu_args(self, index: int, *, accel: str) -> list[str]:
        chardev = f"socket,id=vuinput{index},path={os.fspath(self.socket)}"
        device = f"vhost-user-input-pci,id=input{index},chardev=vuinput{index}"
        return ["-chardev", chardev, "-device", device]


@dataclasses.dataclass
class QemuVirtioInput(Device):
    """QEMU's own ``virtio-keyboard-pci`` / ``virtio-tablet-pci`` / ``virtio-mouse-pci``
    (``kind``), the reference for ``virtio serve input``; QMP ``input-send-event``
    (events from :func:`qmp_key`, :func:`qmp_abs`) drives it.  ``serial`` -> ``uniq``."""

    kind: str
    serial: str | None = None

    def qemu_args(self, index: int, *, accel: str) -> list[str]:
        if self.kind not in ("keyboard", "tablet", "mouse"):
            raise ValueError(f"no virtio-{self.kind}-pci in QEMU")
        props = _props({"id": f"qinput{index}", "serial": self.serial})
        return ["-device", f"virtio-{self.kind}-pci{props}"]


def qmp_key(qcode: str, down: bool) -> dict[str, Any]:
    """One ``input-send-event`` key event (``qcode``: QEMU's key name, e.g. ``"a"``)."""
    return {"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": qcode}}}


def qmp_abs(axis: str, value: int) -> dict[str, Any]:
    """One ``input-send-event`` absolute axis event (``axis`` ``x``/``y``, 0..0x7fff)."""
    return {"type": "abs", "data": {"axis": axis, "value": value}}


@dataclasses.dataclass
class Disk(Device):
    """A plain disk image: ``interface`` ``virtio`` (virtio-blk-pci) or ``ide``."""

    path: str | os.PathLike[str]
    interface: str = "virtio"
    format: str = "raw"
    readonly: bool = False
    cache: str | None = None
    props: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def qemu_args(self, index: int, *, accel: str) -> list[str]:
        drive = f"file={os.fspath(self.path)},format={self.format},id=disk{index}"
        if self.readonly:
            drive += ",readonly=on"
        if self.cache:
            drive += f",cache={self.cache}"
        if self.interface == "ide":
            return ["-drive", drive + ",if=ide"]
        if self.interface == "virtio":
            dev = f"virtio-blk-pci,drive=disk{index},id=vblk{index}" + _props(self.props)
            return ["-drive", drive + ",if=none", "-device", dev]
        raise ValueError(f"unknown disk interface {self.interface!r}")


# --------------------------------------------------------------------------- prerequisites


def default_accel() -> str:
    """``$PYVIRTIO_QEMU_ACCEL`` or ``tcg``."""
    return os.environ.get("PYVIRTIO_QEMU_ACCEL") or "tcg"


def find_qemu(binary: str = QEMU_BINARY) -> str:
    """Path of ``qemu-system-x86_64`` (or ``$PYVIRTIO_QEMU``); QemuUnavailable if none."""
    explicit = os.environ.get("PYVIRTIO_QEMU")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise QemuUnavailable(f"PYVIRTIO_QEMU={explicit} is not executable")
    path = shutil.which(binary)
    if path is None:
        raise QemuUnavailable(
            f"{binary} not found on PATH (Debian: apt-get install qemu-system-x86; "
            "./setup.sh installs it)"
        )
    return path


QEMU_VERSIONS = ("7.2", "10.0")
"""The QEMU versions the project tests against: Debian 12's own, and bookworm-backports'
(unpacked by ``./setup.sh`` into ``${PYVIRTIO_CACHE:-~/.cache/pyvirtio}/qemu-10.0``)."""


@dataclasses.dataclass(frozen=True)
class QemuBinary:
    """One ``qemu-system-x86_64`` to run: its path, and for an unpacked (not installed) QEMU
    the data and module directories it must be pointed at."""

    path: str
    version: str
    data_dir: str | None = None
    module_dir: str | None = None

    def args(self) -> list[str]:
        """Arguments that come right after the binary (``-L`` for an unpacked QEMU)."""
        return ["-L", self.data_dir] if self.data_dir else []

    def env(self) -> dict[str, str] | None:
        """The environment to run it in (``QEMU_MODULE_DIR`` for an unpacked QEMU), or None."""
        if not self.module_dir:
            return None
        return {**os.environ, "QEMU_MODULE_DIR": self.module_dir}

    def command(self) -> list[str]:
        """``[path, *args()]``: the start of a command line."""
        return [self.path, *self.args()]


def _unpacked_qemu10() -> Path:
    base = os.environ.get("PYVIRTIO_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pyvirtio"
    )
    return Path(base) / "qemu-10.0"


def qemu_binary(version: str | None = None) -> QemuBinary:
    """The QEMU of ``version`` (one of :data:`QEMU_VERSIONS`; None: the default one, i.e.
    ``$PYVIRTIO_QEMU`` or the system's).  QemuUnavailable, with the reason, if absent."""
    if version is None:
        return QemuBinary(find_qemu(), "default")
    if version == "7.2":
        path = shutil.which(QEMU_BINARY)
        if path is None:
            raise QemuUnavailable("QEMU 7.2 not found on PATH (./setup.sh installs it)")
        return QemuBinary(path, "7.2")
    if version == "10.0":
        root = _unpacked_qemu10()
        path = root / "usr" / "bin" / QEMU_BINARY
        if not os.access(path, os.X_OK):
            raise QemuUnavailable(
                f"QEMU 10.0 not unpacked at {root} (./setup.sh fetches it from "
                "bookworm-backports unless PYVIRTIO_NO_QEMU10=1)"
            )
        return QemuBinary(
            str(path),
            "10.0",
            data_dir=str(root / "usr" / "share" / "qemu"),
            module_dir=str(root / "usr" / "lib" / "x86_64-linux-gnu" / "qemu"),
        )
    raise ValueError(f"unknown QEMU version {version!r} (known: {', '.join(QEMU_VERSIONS)})")


def check_prerequisites(image: GuestImage | None = None, *, accel: str | None = None) -> str:
    """Raise QemuUnavailable with a clear reason if a guest cannot be booted; else the QEMU path."""
    qemu = find_qemu()
    accel = accel or default_accel()
    if accel.startswith("kvm") and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise QemuUnavailable("accel=kvm asked for but /dev/kvm is not usable")
    if image is not None:
        for path in (image.kernel, image.initrd):
            if not path.is_file():
                raise QemuUnavailable(f"guest image incomplete: {path} is missing")
    return qemu


# --------------------------------------------------------------------------- QMP


class QmpClient:
    """A minimal QMP client on a unix socket.

    ::

        qmp = await QmpClient.connect(path)
        await qmp.execute("query-status")      # -> {"running": True, ...}
        await qmp.execute("device_del", {"id": "blk0"})
        await qmp.aclose()

    Events received while waiting for replies are appended to ``events``.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._lock = trio.Lock()
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, timeout: float = 10.0) -> QmpClient:
        """Connect (retrying while the socket is not there yet) and negotiate capabilities."""
        with trio.fail_after(timeout):
            while True:
                try:
                    stream = await trio.open_unix_socket(os.fspath(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await trio.sleep(0.05)
            client = cls(stream)
            try:
                client.greeting = await client._read_message()
                await client.execute("qmp_capabilities")
            except BaseException:
                await stream.aclose()
                raise
        return client

    async def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            data = await self._stream.receive_some(65536)
            if not data:
                raise QemuError("QMP connection closed")
            self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return json.loads(line)

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """Run a QMP command; return its ``return`` value or raise QmpError."""
        async with self._lock:
            self._next_id += 1
            msg_id = f"pyvirtio-{self._next_id}"
            msg: dict[str, Any] = {"execute": command, "id": msg_id}
            if arguments:
                msg["arguments"] = dict(arguments)
            with trio.fail_after(timeout):
                await self._stream.send_all(json.dumps(msg).encode() + b"\n")
                while True:
                    reply = await self._read_message()
                    if "event" in reply:
                        self.events.append(reply)
                        continue
                    if reply.get("id") != msg_id:
                        continue
                    if "error" in reply:
                        raise QmpError(command, reply["error"])
                    return reply.get("return")

    async def wait_event(
        self, event: str, *, data: Mapping[str, Any] | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Wait for an ``event``, with ``data``'s items in its data; pops it from ``events``."""

        def matches(ev: dict[str, Any]) -> bool:
            got = ev.get("data", {})
            return ev.get("event") == event and all(
                got.get(k) == v for k, v in (data or {}).items()
            )

        async with self._lock:
            with trio.fail_after(timeout):
                while True:
                    for i, ev in enumerate(self.events):
                        if matches(ev):
                            return self.events.pop(i)
                    msg = await self._read_message()
                    if "event" in msg:
                        self.events.append(msg)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# --------------------------------------------------------------------------- the guest


class QemuGuest:
    """One QEMU process running the test guest.  Use as ``async with``.

    Parameters:
        image: the guest image (:func:`virtio.testing.guest_image.ensure_image`).
        devices: :class:`VhostUserBlk`, :class:`VhostUserNet`, :class:`Disk` or any
            :class:`Device`; vhost-user-blk disks appear as /dev/vda, vdb, ... in order
            (before virtio ``Disk``\\ s, which come later in PCI order).
        extra_args: appended to the QEMU command line as is.
        script: run this shell script (script mode) instead of an interactive shell;
            collect it with :meth:`wait_script`.
        fio: boot the initramfs that also contains ``fio``.
        accel: ``tcg`` (default, or $PYVIRTIO_QEMU_ACCEL), ``kvm``, ...
        qmp: open a QMP socket; :attr:`qmp` is a connected :class:`QmpClient`.
        append: extra kernel command line.
        kernel_loglevel: console log level (1: only emergencies reach the console, so
            command output stays clean; ``dmesg`` in the guest still has everything).
        console_log: also write everything the console prints to this file.
        boot_timeout: seconds to wait for the interactive shell.
        qemu: which QEMU (:func:`qemu_binary`, e.g. ``qemu_binary("10.0")``); default the
            system's (or ``$PYVIRTIO_QEMU``).
        incoming: a live-migration destination (``-incoming URI``, e.g. ``unix:PATH``):
            :meth:`start` returns once QEMU runs (use ``qmp=True``); after the
            migration, :meth:`take_over_console` lets :meth:`run` talk to the guest.
    """

    def __init__(
        self,
        image: GuestImage,
        *,
        devices: Iterable[Device] = (),
        extra_args: Sequence[str] = (),
        script: str | None = None,
        fio: bool = False,
        accel: str | None = None,
        memory_mb: int = 512,
        smp: int = 2,
        qmp: bool = False,
        append: str = "",
        kernel_loglevel: int = 1,
        console_log: str | os.PathLike[str] | None = None,
        boot_timeout: float = 120.0,
        qemu: QemuBinary | None = None,
        incoming: str | None = None,
    ) -> None:
        self.image = image
        self.qemu = qemu
        self.incoming = incoming
        self.devices = list(devices)
        self.extra_args = list(extra_args)
        self.script = script
        self.fio = fio
        self.accel = accel or default_accel()
        self.memory_mb = memory_mb
        self.smp = smp
        self.want_qmp = qmp
        self.append = append
        self.kernel_loglevel = kernel_loglevel
        self.console_log = Path(console_log) if console_log is not None else None
        self.boot_timeout = boot_timeout
        self.nonce = secrets.token_hex(8)
        self.qmp: QmpClient | None = None
        self.boot_seconds: float | None = None
        self._proc: trio.Process | None = None
        self._tmpdir: Path | None = None
        self._stderr_file: Any = None
        self._console_file: Any = None
        self._buf = bytearray()
        self._lock = trio.Lock()
        self._seq = 0
        self._jobs = 0
        self._hotplugged: dict[str, tuple[Device, int]] = {}
        self._broken: str | None = None
        self._t0 = 0.0

    # -- lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    @property
    def workdir(self) -> Path:
        """This guest's private temporary directory (removed on shutdown)."""
        if self._tmpdir is None:
            raise QemuError("guest not started")
        return self._tmpdir

    @property
    def console(self) -> str:
        """Everything the serial console printed so far (read so far)."""
        return self._buf.decode(errors="replace").replace("\r\n", "\n")

    def command_line(self, qemu: str | None = None) -> list[str]:
        """The QEMU command line (needs :attr:`workdir`, i.e. after start)."""
        tmp = self.workdir
        initrd = self.image.initrd_for(fio=self.fio)
        # cryptomgr.notests: no self-tests of every crypto algorithm the kernel
        # registers (0.3-0.5 s of each boot under TCG; the tests check devices, not
        # the guest's crypto).
        append = (
            f"console=ttyS0 quiet loglevel={self.kernel_loglevel} panic=-1 "
            f"cryptomgr.notests {self.append}"
        ).strip()
        mem = f"{self.memory_mb}M"
        if qemu is None:
            qemu = self.qemu.path if self.qemu is not None else find_qemu()
        args = [
            qemu,
            *(self.qemu.args() if self.qemu is not None else []),
            "-machine", f"pc,accel={self.accel}",
            "-cpu", "max",
            "-m", mem,
            "-smp", str(self.smp),
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio",
            "-kernel", str(self.image.kernel),
            "-initrd", str(initrd),
            "-append", append,
            "-fw_cfg", f"name=opt/pyvirtio/nonce,string={self.nonce}",
        ]  # fmt: skip
        if self.script is not None:
            script_path = tmp / "script.sh"
            script_path.write_text(self.script)
            args += ["-fw_cfg", f"name=opt/pyvirtio/script,file={script_path}"]
        if self.want_qmp:
            args += ["-qmp", f"unix:{tmp / 'qmp.sock'},server=on,wait=off"]
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        for i, dev in enumerate(self.devices):
            args += dev.qemu_args(i, accel=self.accel)
        return args + self.extra_args

    async def start(self) -> None:
        """Start QEMU; in interactive mode, wait until the guest shell is ready."""
        if self._proc is not None:
            raise QemuError("guest already started")
        qemu = check_prerequisites(self.image, accel=self.accel)
        if self.qemu is not None:
            qemu = self.qemu.path
        self._tmpdir = Path(tempfile.mkdtemp(prefix="pyvirtio-qemu-"))
        try:
            cmd = self.command_line(qemu)
            self._stderr_file = open(self._tmpdir / "qemu.stderr", "wb")  # noqa: SIM115
            if self.console_log is not None:
                self._console_file = open(self.console_log, "wb")  # noqa: SIM115
            self._t0 = time.monotonic()
            self._proc = await trio.lowlevel.open_process(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr_file,
                env=self.qemu.env() if self.qemu is not None else None,
            )
            _grow_pipe(self._proc.stdout)
            if self.want_qmp:
                try:
                    self.qmp = await QmpClient.connect(self._tmpdir / "qmp.sock")
                except (OSError, trio.TooSlowError, QemuError) as e:
                    raise self._error(GuestExited, f"QMP connection failed: {e!r}") from e
            if self.script is None and self.incoming is None:
                await self._expect(
                    re.compile(rb"@@PYVIRTIO-READY " + self.nonce.encode() + rb"@@\r?\n"),
                    0,
                    self.boot_timeout,
                    "the guest shell to come up",
                )
                self.boot_seconds = time.monotonic() - self._t0
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    async def aclose(self, *, grace: float = 5.0) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL after ``grace`` s) and clean up.  Idempotent."""
        with trio.CancelScope(shield=True):
            try:
                if self.qmp is not None:
                    with contextlib.suppress(Exception):
                        await self.qmp.aclose()
                    self.qmp = None
                proc = self._proc
                if proc is not None:
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.send_signal(signal.SIGTERM)
                        with trio.move_on_after(grace):
                            await self._drain_until_exit()
                        if proc.returncode is None:
                            with contextlib.suppress(ProcessLookupError):
                                proc.kill()
                    await proc.wait()
                    for stream in (proc.stdin, proc.stdout):
                        if stream is not None:
                            with contextlib.suppress(Exception):
                                await stream.aclose()
            finally:
                for f in (self._stderr_file, self._console_file):
                    if f is not None:
                        f.close()
                self._stderr_file = self._console_file = None
                if self._tmpdir is not None:
                    shutil.rmtree(self._tmpdir, ignore_errors=True)
                    self._tmpdir = None

    async def _drain_until_exit(self) -> None:
        assert self._proc is not None
        if self._proc.stdout is not None:
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                while await self._receive():
                    pass
        await self._proc.wait()

    async def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for QEMU to exit by itself (e.g. after ``poweroff -f``); its exit code."""
        assert self._proc is not None
        try:
            with trio.fail_after(timeout):
                await self._drain_until_exit()
        except trio.TooSlowError:
            raise self._error(GuestTimeout, f"QEMU still running after {timeout} s") from None
        assert self._proc.returncode is not None
        return self._proc.returncode

    async def poweroff(self, timeout: float = 30.0) -> int:
        """Power the guest off from inside (``sync; poweroff -f``); QEMU's exit code."""
        async with self._lock:
            self._check_usable()
            await self._send_command("sync; poweroff -f", self._next_id())
            self._broken = "powered off"
        return await self.wait_exit(timeout)

    def take_over_console(self, source: QemuGuest) -> None:
        """Live migration: this (destination) QEMU now runs the guest ``source`` booted.
        Its shell, background jobs and command numbering carry over; call once the
        migration completed (the source's console is not read any more)."""
        self.nonce = source.nonce
        self._seq = source._seq
        self._jobs = source._jobs

    # -- hot-plug (needs qmp=True)

    async def hotplug(self, device: Device) -> str:
        """Hot-plug ``device`` through QMP (only :class:`VhostUserBlk` so far); its qdev id.

        The guest sees it shortly after (ACPI PCI hot-plug): poll ``/sys/block``.
        """
        if self.qmp is None:
            raise QemuError("hot-plug needs QemuGuest(..., qmp=True)")
        index = 100 + len(self.devices) + len(self._hotplugged)
        for command, args in device.hotplug_commands(index):
            await self.qmp.execute(command, args)
        dev_id = device.device_id(index)
        self._hotplugged[dev_id] = (device, index)
        return dev_id

    async def unplug(self, dev_id: str, *, timeout: float = 30.0) -> None:
        """Ask the guest to release a hot-plugged device; wait until QEMU deleted it."""
        if self.qmp is None:
            raise QemuError("unplug needs QemuGuest(..., qmp=True)")
        await self.qmp.execute("device_del", {"id": dev_id})
        await self.qmp.wait_event("DEVICE_DELETED", data={"device": dev_id}, timeout=timeout)
        entry = self._hotplugged.pop(dev_id, None)
        if entry is not None:
            for command, args in entry[0].hotplug_commands(entry[1])[:-1]:
                if command == "chardev-add":
                    await self.qmp.execute("chardev-remove", {"id": args["id"]})

    # -- console I/O

    async def _receive(self) -> bool:
        assert self._proc is not None and self._proc.stdout is not None
        data = await self._proc.stdout.receive_some(65536)
        if not data:
            return False
        self._buf += data
        if self._console_file is not None:
            self._console_file.write(data)
            self._console_file.flush()
        return True

    async def _expect(
        self, pattern: re.Pattern[bytes], start: int, timeout: float, what: str
    ) -> re.Match[bytes]:
        try:
            with trio.fail_after(timeout):
                while True:
                    m = pattern.search(self._buf, start)
                    if m is not None:
                        return m
                    if not await self._receive():
                        await self._proc.wait()  # type: ignore[union-attr]
                        self._broken = f"QEMU exited ({self.returncode})"
                        raise self._error(
                            GuestExited,
                            f"QEMU exited with status {self.returncode} while waiting for {what}",
                        )
        except trio.TooSlowError:
            self._broken = f"timed out waiting for {what}"
            raise self._error(
                GuestTimeout, f"timed out after {timeout} s waiting for {what}"
            ) from None

    def _error(self, cls: type[GuestError], message: str) -> GuestError:
        stderr = ""
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                stderr = (self._tmpdir / "qemu.stderr").read_text(errors="replace")[-CONSOLE_TAIL:]
        if self._proc is not None and self._proc.returncode is not None:
            rc = self._proc.returncode
            how = f"signal {-rc}" if rc < 0 else f"status {rc}"
            message += f" (QEMU pid {self._proc.pid} ended with {how})"
        return cls(message, console=self.console[-CONSOLE_TAIL:], stderr=stderr)

    def _check_usable(self) -> None:
        if self._proc is None:
            raise QemuError("guest not started")
        if self.script is not None:
            raise QemuError("guest runs in script mode: use wait_script()")
        if self._broken is not None:
            raise self._error(GuestError, f"guest unusable: {self._broken}")

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self._seq}-{secrets.token_hex(4)}"

    async def _send_command(self, command: str, cmd_id: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            await self._proc.stdin.send_all(command_lines(command, cmd_id))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._broken = "QEMU's stdin is closed"
            raise self._error(GuestExited, "QEMU exited (cannot send the command)") from e

    # -- interactive commands

    async def run(self, command: str, *, timeout: float = 60.0, check: bool = True) -> GuestResult:
        """Run ``command`` (shell text, may span lines) in the guest shell.

        Returns its exit status and output (stdout and stderr together).  With
        ``check`` (default) a non-zero status raises :class:`GuestCommandError`.
        """
        async with self._lock:
            self._check_usable()
            cmd_id = self._next_id()
            start = len(self._buf)
            t0 = time.monotonic()
            await self._send_command(command, cmd_id)
            what = f"command {command[:80]!r}"
            begin = await self._expect(
                re.compile(rb"@@PYVIRTIO-BEGIN " + cmd_id.encode() + rb"@@\r?\n"),
                start,
                timeout,
                what,
            )
            remaining = max(0.1, timeout - (time.monotonic() - t0))
            done = await self._expect(
                re.compile(rb"\r?\n@@PYVIRTIO-DONE " + cmd_id.encode() + rb" (-?\d+)@@"),
                begin.end(),
                remaining,
                what,
            )
            result = GuestResult(
                command=command,
                rc=int(done.group(1)),
                raw=bytes(self._buf[begin.end() : done.start()]),
                seconds=time.monotonic() - t0,
            )
        return result.check() if check else result

    async def spawn(self, command: str) -> GuestJob:
        """Start ``command`` in the background of the guest; wait with :meth:`GuestJob.wait`.

        Its output goes to a file in the guest, not to the console.
        """
        self._jobs += 1
        job = GuestJob(self, self._jobs)
        await self.run(
            f"(\n ( {command}\n ) >{job.out} 2>&1 </dev/null\n"
            f" echo $? >{job.rc_path}.tmp && mv {job.rc_path}.tmp {job.rc_path}\n) &\n"
            f"echo $! >{job.pid_path}\n"
        )
        return job

    # -- script mode

    async def wait_script(self, timeout: float = 120.0) -> GuestResult:
        """Script mode: wait for the script's end and QEMU's exit; its status and output."""
        if self._proc is None or self.script is None:
            raise QemuError("not a started script-mode guest")
        t0 = time.monotonic()
        nonce = self.nonce.encode()
        begin = await self._expect(
            re.compile(rb"@@PYVIRTIO-BEGIN " + nonce + rb"@@\r?\n"), 0, timeout, "the script"
        )
        remaining = max(0.1, timeout - (time.monotonic() - t0))
        done = await self._expect(
            re.compile(rb"\r?\n@@PYVIRTIO-EXIT " + nonce + rb" (-?\d+)@@"),
            begin.end(),
            remaining,
            "the script to finish",
        )
        await self.wait_exit(max(5.0, timeout - (time.monotonic() - t0)))
        return GuestResult(
            command=self.script,
            rc=int(done.group(1)),
            raw=bytes(self._buf[begin.end() : done.start()]),
            seconds=time.monotonic() - self._t0,
        )


@dataclasses.dataclass
class GuestJob:
    """A background command started by :meth:`QemuGuest.spawn`."""

    guest: QemuGuest
    number: int

    @property
    def out(self) -> str:
        return f"/tmp/.pyvirtio-job{self.number}.out"

    @property
    def rc_path(self) -> str:
        return f"/tmp/.pyvirtio-job{self.number}.rc"

    @property
    def pid_path(self) -> str:
        return f"/tmp/.pyvirtio-job{self.number}.pid"

    async def poll(self) -> int | None:
        """Its exit status, or None while it runs."""
        r = await self.guest.run(f"cat {self.rc_path} 2>/dev/null || echo running")
        text = r.output.strip()
        return None if text == "running" else int(text)

    async def output(self) -> str:
        return (await self.guest.run(f"cat {self.out}")).output

    async def wait(
        self, *, timeout: float = 60.0, poll_interval: float = 0.2, check: bool = True
    ) -> GuestResult:
        """Wait for it to finish (polling from the host, so a timeout leaves the guest usable)."""
        t0 = time.monotonic()
        while (rc := await self.poll()) is None:
            if time.monotonic() - t0 >= timeout:
                raise self.guest._error(
                    GuestTimeout, f"background job {self.number} still running after {timeout} s"
                )
            await trio.sleep(poll_interval)
        result = GuestResult(
            command=f"job {self.number}",
            rc=rc,
            raw=(await self.output()).encode(),
            seconds=time.monotonic() - t0,
        )
        return result.check() if check else result

    async def kill(self, sig: str = "KILL") -> None:
        await self.guest.run(f"kill -{sig} $(cat {self.pid_path}) 2>/dev/null", check=False)


def command_lines(command: str, cmd_id: str) -> bytes:
    """The console lines that hand ``command`` to the guest shell: its base64 text in
    parts of at most :data:`LINE_CHUNK` characters, ``@@P <id> <part>`` lines then one
    ``@@C <id> <last part>`` line (the guest runs the command on that one)."""
    payload = base64.b64encode(command.encode()).decode()
    parts = [payload[i : i + LINE_CHUNK] for i in range(0, len(payload), LINE_CHUNK)] or [""]
    lines = [f"@@P {cmd_id} {part}\n" for part in parts[:-1]]
    lines.append(f"@@C {cmd_id} {parts[-1]}\n")
    return "".join(lines).encode()


def _grow_pipe(stream: Any) -> None:
    """Make QEMU's stdout pipe 1 MiB so console output rarely waits for us."""
    with contextlib.suppress(Exception):
        import fcntl

        fcntl.fcntl(stream.fileno(), 1031, 1 << 20)  # F_SETPIPE_SZ


async def run_guest_script(
    image: GuestImage, script: str, *, timeout: float = 120.0, **kwargs: Any
) -> GuestResult:
    """Boot a guest that runs ``script`` (via fw_cfg), wait for it; status and output."""
    async with QemuGuest(image, script=script, **kwargs) as guest:
        return await guest.wait_script(timeout)
