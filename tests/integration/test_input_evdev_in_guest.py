"""evdev passthrough (issue 11 §2) against a real kernel evdev, inside a QEMU guest.

The host kernel here has no input subsystem (no ``/dev/uinput``), so
``test_vu_input_qemu.py::test_uinput_passthrough_and_led_write_back`` skips.  The
Debian guest kernel has evdev and uinput: one TCG guest (QEMU 7.2, the system's; no
vhost-user device is needed in QEMU) mounts the host's root file system read-only over
9p (``-virtfs ... readonly=on``), loads ``uinput``, chroots into the host root (with the
guest's /dev, /proc, /sys and a tmpfs /tmp) and runs ``python -m
virtio.testing.evdev_in_guest`` with this checkout's venv.  That script creates a uinput
pen tablet (:data:`~virtio.testing.evdev_in_guest.DECLARED`), serves it with the
back-end's stack in process (``EvdevSource`` grabbed, ``VirtioInput``,
``VhostUserServer``) driven by the testing kit's ``VhostUserFrontend``, and prints what
it observed as JSON.  Each test below checks one part of that against the declaration,
encoded here from the spec's structs (virtio 1.4 §5.8.4), not by the product's code.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from evdev import ecodes as e

from virtio.testing.evdev_in_guest import AFTER_STATUS, DECLARED, GROUP_HELD, GROUPS, MARKER
from virtio.testing.qemu import QemuGuest, find_qemu

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
SYN = [e.EV_SYN, e.SYN_REPORT, 0]
ID_NAME, ID_SERIAL, ID_DEVIDS, PROP_BITS, EV_BITS, ABS_INFO = 0x01, 0x02, 0x03, 0x10, 0x11, 0x12

GUEST_SCRIPT = r"""
set -e
[ -e /dev/uinput ] || modprobe uinput
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host
# A checkout under /tmp (CI clones there) must stay visible under the tmpfs: keep a
# bind of it from before, and put it back on top.
case "{repo}" in /tmp/*) mkdir -p /stash && mount -o bind "/host{repo}" /stash;; esac
mount -t tmpfs tmpfs /host/tmp
case "{repo}" in /tmp/*) mkdir -p "/host{repo}" && mount -o bind /stash "/host{repo}";; esac
mount -o bind /dev /host/dev
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
chroot /host /bin/sh -c 'cd "$0" && exec env -i PATH=/usr/bin:/bin HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 "$1" -m virtio.testing.evdev_in_guest' {repo} {python}
"""


def _guest_modules_missing(image: Any) -> list[str]:
    """Of uinput and the 9p client, what the image neither loads nor has built in."""
    have = set(image.manifest.get("modules", [])) | set(image.manifest.get("modules_builtin", []))
    return [m for m in ("uinput", "9p", "9pnet_virtio") if m not in have]


def _qemu_without_9p() -> str | None:
    """Why the system QEMU cannot export a directory over 9p, or ``None``."""
    qemu = find_qemu()
    res = subprocess.run([qemu, "-device", "help"], capture_output=True, text=True, check=False)
    if '"virtio-9p-pci"' not in res.stdout:
        return f"{qemu} has no virtio-9p-pci device (built without virtfs)"
    return None


async def _run_in_guest(image: Any, console_log: Path) -> dict[str, Any]:
    script = GUEST_SCRIPT.format(repo=REPO, python=Path(sys.executable).absolute())
    virtfs = "local,path=/,mount_tag=hostroot,security_model=none,readonly=on"
    guest = QemuGuest(
        image, script=script, extra_args=["-virtfs", virtfs], memory_mb=768, console_log=console_log
    )
    async with guest:
        res = await guest.wait_script(timeout=900)
    out = res.output
    assert res.rc == 0, out[-4000:]
    match = re.search(re.escape(MARKER) + r" (\{.*\})@@", out)
    assert match, out[-4000:]
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def observed(guest_image, tmp_path_factory) -> dict[str, Any]:
    """What the script saw in one guest boot (shared by every check)."""
    missing = _guest_modules_missing(guest_image)
    if missing:
        pytest.skip(f"guest image {guest_image.directory} lacks modules {missing}")
    no_9p = _qemu_without_9p()
    if no_9p:
        pytest.skip(no_9p)
    log = tmp_path_factory.mktemp("evdev-guest") / "console.log"
    return trio.run(_run_in_guest, guest_image, log)


def _string(text: str) -> str:
    return text.encode().hex()


def _bitmap(codes: list[int]) -> str:
    out = bytearray(128)
    for c in codes:
        out[c // 8] |= 1 << (c % 8)
    return bytes(out).rstrip(b"\0").hex()


def expected_config() -> dict[str, str]:
    """The §5.8.4 payloads (size > 0) for DECLARED, keyed ``select/subsel``."""
    ids = DECLARED["ids"]
    events = {**DECLARED["events"], e.EV_ABS: sorted(DECLARED["absinfo"])}
    cfg = {
        f"{ID_NAME:#04x}/0x00": _string(DECLARED["name"]),
        # ID_SERIAL: uinput cannot set uniq (no UI_SET_UNIQ in Linux 6.1): empty, size 0
        f"{ID_DEVIDS:#04x}/0x00": struct.pack(
            "<4H", ids["bustype"], ids["vendor"], ids["product"], ids["version"]
        ).hex(),
        f"{PROP_BITS:#04x}/0x00": _bitmap(DECLARED["properties"]),
    }
    for type_, codes in events.items():
        cfg[f"{EV_BITS:#04x}/{type_:#04x}"] = _bitmap(codes)
    for axis, info in DECLARED["absinfo"].items():
        cfg[f"{ABS_INFO:#04x}/{axis:#04x}"] = struct.pack("<5i", *info).hex()
    return cfg


def test_config_space_reports_what_uinput_declared(observed):
    """§5.8.4: name, IDs, properties, every event type's bits and every ABS_INFO read
    from the kernel evdev; every other select/subsel (serial: uinput sets none,
    EV_SYN, undeclared types and axes, select 0 and 0x7f) has size 0."""
    assert observed["uniq"] == ""
    assert observed["config"] == expected_config()


def test_events_arrive_in_syn_framed_groups(observed):
    """§5.8.6.1: every event written to uinput reaches the eventq, in order, each group
    ended by SYN_REPORT; the group written while the driver had posted 2 buffers for
    its 4 events was held whole (no buffer used) until more were posted."""
    expected = []
    for group in [GROUP_HELD, *GROUPS]:
        expected += [list(ev) for ev in group] + [SYN]
    assert observed["used_while_held"] == 0
    assert observed["received"] == expected
    stats = observed["statistics"]
    # + the key group written after the status event (last test); the source also
    # read the kernel's echo of the LED change (EV_LED + SYN_REPORT) and dropped it
    assert stats["events"] == len(expected) + len(AFTER_STATUS) + 1
    assert stats["groups"] == 1 + len(GROUPS) + 1
    assert stats["groups_dropped"] == stats["groups_split"] == stats["held"] == 0
    assert observed["events_read"] == len(expected) + 2 + len(AFTER_STATUS) + 1


def test_evdev_grabbed_unless_no_grab(observed):
    """EVIOCGRAB while served: another opener cannot grab (EBUSY) and reads nothing;
    released when the source closes; ``--no-grab`` leaves it grabbable."""
    assert observed["grab_errno_while_served"] == 16  # EBUSY
    assert observed["watcher_events"] == 0
    assert observed["grab_errno_after_close"] == 0
    assert observed["grab_errno_no_grab"] == 0


def test_status_led_written_back_to_uinput(observed):
    """§5.8.6.2: the driver's EV_LED LED_CAPSL 1 on the statusq reaches the uinput fd
    as EV_LED and the evdev's LED state (EVIOCGLED) has Caps Lock on.  The kernel
    passes that change on to the evdev's readers as well: the source reads the echo
    and drops it, so the next group on the eventq is the key group written after it
    (forwarded, a driver that changed the LED again meanwhile would flip back)."""
    assert [e.EV_LED, e.LED_CAPSL, 1] in observed["uinput_fd_events"]
    assert observed["leds"] == [e.LED_CAPSL]
    assert observed["status_echoes"] == 1
    assert observed["eventq_after_status"] == [*[list(ev) for ev in AFTER_STATUS], SYN]
    assert observed["statistics"]["status"] == 1
    assert observed["statistics"]["status_ignored"] == 0


def test_runs_from_this_checkout(observed):
    """The guest ran this worktree's code (a /dev/input node of the guest's kernel)."""
    assert observed["evdev"].startswith("/dev/input/event")
    assert os.path.isdir(REPO / "virtio")
