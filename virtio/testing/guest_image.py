"""Build (and cache) a tiny Linux guest for QEMU-based tests.

The guest is Debian's stock ``linux-image-6.1.*-amd64`` kernel plus an initramfs
made here from ``busybox-static``, the kernel modules a virtio test needs, a few
host binaries (``mke2fs``/``e2fsck``, and ``fio`` in a second initramfs) and an
``/init`` that speaks the protocol of :mod:`virtio.testing.qemu`.

Everything is cached in ``${PYVIRTIO_CACHE:-~/.cache/pyvirtio}/guest/<kver>-v<N>/``
(``<kver>`` the kernel release, ``<N>`` :data:`IMAGE_FORMAT`), with:

- ``vmlinuz``         the kernel;
- ``initrd.img``      busybox + modules + mke2fs/e2fsck + /init, an uncompressed cpio
                      archive (small, boots fast);
- ``initrd-fio.img``  the same followed by a second archive holding ``fio`` and its
                      shared libraries (Linux unpacks concatenated archives);
- ``manifest.json``   what was put in, written last: a directory without it is junk.

Building needs ``apt-get``/``apt-cache`` (with package lists; run ``apt-get update``
first on a new machine), ``dpkg``, ``depmod`` and ``modprobe`` (kmod: the module
closure is ``modprobe --show-depends`` on the extracted kernel) and ``/bin/busybox`` from
``busybox-static``; no root and no network beyond the Debian mirror.  Building is
guarded by a lock, so concurrent test runs share one build.

Command line::

    python -m virtio.testing.guest_image [--out DIR] [--rebuild] [--no-fio] [--print]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "BASE_MODULES",
    "IMAGE_FORMAT",
    "GuestImage",
    "GuestImageError",
    "GuestImageUnavailable",
    "ModuleClosure",
    "build_image",
    "cache_dir",
    "ensure_image",
    "find_cached_image",
    "kernel_package",
    "module_closure",
]

#: Bump when the image content or the /init protocol changes: old caches are ignored.
IMAGE_FORMAT = 6

#: The Debian metapackage whose dependency names the kernel to use.
KERNEL_METAPACKAGE = "linux-image-amd64"

#: Kernel modules put in the initramfs (with what ``modprobe --show-depends`` says they
#: need) and loaded by /init, in this order.  Names or aliases as ``modprobe`` takes
#: them (``-`` and ``_`` are the same); to add one, append it here.
BASE_MODULES: tuple[str, ...] = (
    # virtio transports and devices
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_input",
    "virtio_console",
    "virtio_scsi",
    "virtio_balloon",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    # plain disks (-drive if=ide) and SCSI disks
    "ata_piix",
    "ata_generic",
    "sd_mod",
    # file systems and the crc helpers they ask for by crypto alias
    "ext4",
    "crc32c_generic",
    "crc32c_intel",
    "libcrc32c",
    "crct10dif_generic",
    # the script channel and input events
    "qemu_fw_cfg",
    "evdev",
    # evdev passthrough checked inside the guest (tests/integration/
    # test_input_evdev_in_guest.py): uinput makes a real evdev there, and the host's
    # root file system is mounted over 9p to run the project's venv in a chroot
    "uinput",
    "9p",
    "9pnet_virtio",
)

#: Host programs copied (with their shared libraries) into the base initramfs,
#: as (host path, guest path, extra guest names).
BASE_HOST_PROGRAMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("/usr/sbin/mke2fs", "/usr/sbin/mke2fs", ("mkfs.ext4", "mkfs.ext3", "mkfs.ext2")),
    ("/usr/sbin/e2fsck", "/usr/sbin/e2fsck", ("fsck.ext4", "fsck.ext3", "fsck.ext2")),
    ("/usr/bin/evtest", "/usr/bin/evtest", ()),  # virtio-input checks (Debian evtest)
)
BASE_HOST_FILES: tuple[str, ...] = ("/etc/mke2fs.conf",)

#: Host programs in the second (fio) initramfs.
FIO_HOST_PROGRAMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("/usr/bin/fio", "/usr/bin/fio", ()),
)

BUSYBOX = "/bin/busybox"


class GuestImageError(RuntimeError):
    """Building the guest image failed."""


class GuestImageUnavailable(GuestImageError):
    """The tools needed to build the image are missing (skip-worthy, not a bug)."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel, initramfs(es) and what went into them."""

    directory: Path
    kernel: Path
    initrd: Path
    initrd_fio: Path | None
    kernel_version: str
    kernel_package: str
    manifest: dict

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        manifest = json.loads((directory / "manifest.json").read_text())
        fio = manifest.get("initrd_fio")
        image = cls(
            directory=directory,
            kernel=directory / manifest["kernel"],
            initrd=directory / manifest["initrd"],
            initrd_fio=directory / fio if fio else None,
            kernel_version=manifest["kernel_version"],
            kernel_package=manifest["kernel_package"],
            manifest=manifest,
        )
        for path in (image.kernel, image.initrd, image.initrd_fio):
            if path is not None and not path.is_file():
                raise GuestImageError(f"{directory}: {path.name} is missing")
        return image

    def initrd_for(self, *, fio: bool = False) -> Path:
        """The initramfs to boot: the fio one when ``fio`` (raises if it wasn't built)."""
        if not fio:
            return self.initrd
        if self.initrd_fio is None:
            raise GuestImageError(f"{self.directory}: built without fio (no initrd-fio.img)")
        return self.initrd_fio


def cache_dir() -> Path:
    """``${PYVIRTIO_CACHE:-~/.cache/pyvirtio}/guest``."""
    base = os.environ.get("PYVIRTIO_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pyvirtio"
    )
    return Path(base) / "guest"


def _log(msg: str) -> None:
    print(f"[guest-image] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    except FileNotFoundError as e:
        raise GuestImageUnavailable(f"{cmd[0]} not found: {e}") from e
    if res.returncode != 0:
        raise GuestImageError(
            f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr.strip()}"
        )
    return res


def missing_tools() -> list[str]:
    """Host tools the builder needs that are absent (empty: can build)."""
    missing = [
        tool for tool in ("apt-get", "apt-cache", "dpkg", "dpkg-deb") if shutil.which(tool) is None
    ]
    missing.extend(f"{tool} (kmod)" for tool in ("depmod", "modprobe") if _which_sbin(tool) is None)
    if not os.path.isfile(BUSYBOX):
        missing.append(f"{BUSYBOX} (busybox-static)")
    return missing


def _which_sbin(name: str) -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def kernel_package() -> str:
    """The ``linux-image-<ver>-amd64`` package that ``linux-image-amd64`` depends on."""
    res = _run(["apt-cache", "depends", "--important", KERNEL_METAPACKAGE])
    names = re.findall(r"Depends:\s*(linux-image-[0-9][^\s<>]*)", res.stdout)
    if not names:
        raise GuestImageError(
            f"apt-cache knows no dependency of {KERNEL_METAPACKAGE} "
            f"(run `apt-get update` first?):\n{res.stdout}{res.stderr}"
        )
    return names[0]


# --------------------------------------------------------------------------- cache


def _image_dirs() -> list[Path]:
    root = cache_dir()
    if not root.is_dir():
        return []
    suffix = f"-v{IMAGE_FORMAT}"
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.endswith(suffix)]
    return sorted(
        dirs,
        key=lambda p: (
            (p / "manifest.json").stat().st_mtime if (p / "manifest.json").exists() else 0.0
        ),
    )


def find_cached_image(kernel_version: str | None = None) -> GuestImage | None:
    """The newest complete cached image (of that kernel release, if given), or None."""
    for directory in reversed(_image_dirs()):
        if kernel_version is not None and directory.name != f"{kernel_version}-v{IMAGE_FORMAT}":
            continue
        try:
            return GuestImage.load(directory)
        except (OSError, ValueError, KeyError, GuestImageError):
            continue
    return None


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_image(*, fio: bool = True) -> GuestImage:
    """Return a cached image (any kernel release), building one if there is none."""
    image = find_cached_image()
    if image is not None and (image.initrd_fio is not None or not fio):
        return image
    return build_image(fio=fio)


def build_image(out: Path | None = None, *, fio: bool = True, rebuild: bool = False) -> GuestImage:
    """Build the image for the kernel ``linux-image-amd64`` currently depends on.

    ``out`` defaults to the cache; an existing complete image there is reused
    unless ``rebuild``.
    """
    missing = missing_tools()
    if missing:
        raise GuestImageUnavailable("cannot build the guest image, missing: " + ", ".join(missing))
    with _build_lock():
        package = kernel_package()
        kver = package.removeprefix("linux-image-")
        final = Path(out) if out is not None else cache_dir() / f"{kver}-v{IMAGE_FORMAT}"
        if not rebuild and (final / "manifest.json").exists():
            with contextlib.suppress(OSError, ValueError, KeyError, GuestImageError):
                image = GuestImage.load(final)
                if image.initrd_fio is not None or not fio:
                    _log(f"reusing {final}")
                    return image
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=final.parent) as tmp:
            staging = Path(tmp) / "out"
            staging.mkdir()
            _build_into(Path(tmp), staging, package, kver, fio=fio)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        _log(f"guest image ready in {final}")
        return GuestImage.load(final)


# --------------------------------------------------------------------------- build


def _build_into(tmp: Path, out: Path, package: str, kver: str, *, fio: bool) -> None:
    t0 = time.monotonic()
    debdir = tmp / "deb"
    debdir.mkdir()
    _log(f"downloading {package}")
    _run(["apt-get", "download", package], cwd=debdir)
    debs = list(debdir.glob("*.deb"))
    if len(debs) != 1:
        raise GuestImageError(f"apt-get download {package} gave {debs}")
    deb_version = _run(["dpkg-deb", "-f", str(debs[0]), "Version"]).stdout.strip()
    kroot = tmp / "kernel"
    _log(f"extracting {debs[0].name}")
    _run(["dpkg-deb", "-x", str(debs[0]), str(kroot)])
    kernels = sorted((kroot / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise GuestImageError(f"{package} contains no /boot/vmlinuz-*")
    release = kernels[0].name.removeprefix("vmlinuz-")
    base = kroot if (kroot / "lib" / "modules" / release).is_dir() else kroot / "usr"
    moddir = base / "lib" / "modules" / release
    if not moddir.is_dir():
        raise GuestImageError(f"{package} has no lib/modules/{release}")
    _run(["depmod", "-b", str(base), release], env=_sbin_env())

    config = _read_kconfig(kroot / "boot" / f"config-{release}")
    closure = module_closure(base, release, BASE_MODULES)
    modules = closure.files

    # -- base initramfs tree
    tree = tmp / "initramfs"
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "mnt",
        "root",
        "etc/pyvirtio",
        "var/tmp",
        "lib64",
    ):
        (tree / d).mkdir(parents=True, exist_ok=True)
    _install_busybox(tree)
    tmoddir = tree / "lib" / "modules" / release
    tmoddir.mkdir(parents=True)
    for rel in sorted(modules.values()):
        dst = tmoddir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, dst)
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (moddir / meta).exists():
            shutil.copy2(moddir / meta, tmoddir / meta)
    _run(["depmod", "-b", str(tree), release], env=_sbin_env())
    loaded = [m for m in BASE_MODULES if m not in closure.builtin]
    (tree / "etc/pyvirtio/modules").write_text("\n".join(loaded) + "\n")
    base_progs = _install_host_programs(tree, BASE_HOST_PROGRAMS)
    for f in BASE_HOST_FILES:
        if os.path.isfile(f):
            _copy_file(Path(f), tree / f.lstrip("/"))
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\n")
    (tree / "etc/hostname").write_text("pyvirtio-guest\n")
    (tree / "etc/mtab").symlink_to("/proc/mounts")
    init = tree / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    (tree / "etc/pyvirtio/format").write_text(f"{IMAGE_FORMAT}\n")

    shutil.copy2(kernels[0], out / "vmlinuz")
    kernel_file = "vmlinuz"
    if config.get("CONFIG_PVH") == "y" and _extract_vmlinux(kernels[0], out / "vmlinux"):
        # QEMU boots an ELF vmlinux through its PVH entry point: no in-guest
        # decompression of the xz'ed bzImage, which costs ~3 s under TCG.
        kernel_file = "vmlinux"
    _log("writing initrd.img")
    base_entries = [
        *_tree_entries(tree),
        _CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
    ]
    base_bytes = _cpio(base_entries)
    (out / "initrd.img").write_bytes(base_bytes)

    fio_progs: list[str] = []
    if fio:
        ftree = tmp / "initramfs-fio"
        ftree.mkdir()
        fio_progs = _install_host_programs(ftree, FIO_HOST_PROGRAMS, skip_in=tree)
        if not fio_progs:
            raise GuestImageError("fio requested but /usr/bin/fio is not installed on the host")
        _log("writing initrd-fio.img")
        (out / "initrd-fio.img").write_bytes(base_bytes + _cpio(_tree_entries(ftree)))

    manifest = {
        "format": IMAGE_FORMAT,
        "kernel": kernel_file,
        "bzimage": "vmlinuz",
        "initrd": "initrd.img",
        "initrd_fio": "initrd-fio.img" if fio else None,
        "kernel_version": release,
        "kernel_package": package,
        "kernel_package_version": deb_version,
        "modules": sorted(modules),
        "modules_loaded_at_boot": loaded,
        "modules_builtin": list(closure.builtin),
        "kconfig": {
            k: config.get(k)
            for k in (
                "CONFIG_VIRTIO_PCI",
                "CONFIG_VIRTIO_BLK",
                "CONFIG_EXT4_FS",
                "CONFIG_FW_CFG_SYSFS",
                "CONFIG_DEVTMPFS",
                "CONFIG_RD_GZIP",
            )
        },
        "busybox": _busybox_version(),
        "host_programs": base_progs,
        "fio_programs": fio_progs,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _extract_vmlinux(bzimage: Path, dst: Path) -> bool:
    """Decompress the ELF kernel out of a bzImage (xz or gzip payload); False if unknown."""
    import lzma
    import zlib

    data = bzimage.read_bytes()
    candidates: list[tuple[int, object]] = []
    i = data.find(b"\xfd7zXZ\x00")
    if i >= 0:
        candidates.append((i, lambda b: lzma.LZMADecompressor().decompress(b)))
    i = data.find(b"\x1f\x8b\x08")
    if i >= 0:
        candidates.append((i, lambda b: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b)))
    for offset, decompress in sorted(candidates, key=lambda c: c[0]):
        try:
            elf = decompress(data[offset:])  # type: ignore[operator]
        except (lzma.LZMAError, zlib.error):
            continue
        if elf[:4] == b"\x7fELF":
            dst.write_bytes(elf)
            return True
    _log("warning: could not extract vmlinux from the bzImage; booting the bzImage")
    return False


def _sbin_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    return env


def _read_kconfig(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                k, v = line.split("=", 1)
                out[k] = v
    return out


@dataclasses.dataclass(frozen=True)
class ModuleClosure:
    """What the guest's ``modprobe`` loads for a list of wanted modules."""

    files: dict[str, str]
    """Module name (``-`` spelled ``_``) -> ``.ko`` path relative to the modules
    directory, for every module to put in the initramfs (dependencies included)."""
    builtin: tuple[str, ...]
    """Wanted names that are built into the kernel (nothing to load)."""


def module_closure(base: Path, release: str, wanted: Iterable[str]) -> ModuleClosure:
    """Ask ``modprobe --show-depends`` (``-d base -S release``, no host configuration)
    what loading each of ``wanted`` loads in the kernel tree under ``base``: hard
    dependencies, aliases and soft dependencies resolved by kmod itself, from the
    ``modules.*`` files ``depmod -b base`` wrote.  A name modprobe does not know is a
    :class:`GuestImageError`."""
    modprobe = _which_sbin("modprobe")
    if modprobe is None:
        raise GuestImageUnavailable("modprobe (kmod) not found")
    moddir = (base / "lib" / "modules" / release).resolve()
    files: dict[str, str] = {}
    builtin: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pyvirtio-modprobe-") as no_config:
        for name in wanted:
            cmd = [modprobe, "-C", no_config, "-d", str(base), "-S", release]
            res = subprocess.run(
                [*cmd, "--show-depends", name], capture_output=True, text=True, check=False
            )
            if res.returncode != 0:
                raise GuestImageError(f"kernel module {name!r}: {res.stderr.strip()}")
            for line in res.stdout.splitlines():
                action, _, rest = line.strip().partition(" ")
                if action == "builtin":
                    builtin.append(name)
                elif action == "insmod":
                    ko = Path(rest.split()[0]).resolve()
                    files[_norm(ko.name.split(".ko")[0])] = str(ko.relative_to(moddir))
                else:
                    raise GuestImageError(f"modprobe {name}: unexpected line {line!r}")
    return ModuleClosure(files=files, builtin=tuple(builtin))


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _busybox_version() -> str:
    res = subprocess.run([BUSYBOX], capture_output=True, text=True, check=False)
    first = (res.stdout or res.stderr).splitlines()[:1]
    return first[0] if first else "?"


def _install_busybox(tree: Path) -> None:
    shutil.copy2(BUSYBOX, tree / "bin/busybox")
    (tree / "bin/busybox").chmod(0o755)
    res = _run([BUSYBOX, "--list-full"])
    for rel in res.stdout.split():
        rel = rel.strip("/")
        if not rel or rel == "bin/busybox":
            continue
        link = tree / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    shutil.copyfile(os.path.realpath(src), dst)
    dst.chmod(os.stat(os.path.realpath(src)).st_mode & 0o777)


def _shared_libs(binary: str) -> list[str]:
    """Paths (as the loader asks for them) of the libraries ``binary`` needs."""
    res = _run(["ldd", binary])
    libs: list[str] = []
    for line in res.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+\s+=>\s+(/\S+)", line) or re.match(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
        elif "not found" in line:
            raise GuestImageError(f"{binary}: missing shared library: {line}")
    return libs


def _install_host_programs(
    tree: Path,
    programs: Iterable[tuple[str, str, tuple[str, ...]]],
    *,
    skip_in: Path | None = None,
) -> list[str]:
    """Copy host programs with their libraries (skipping files already in ``skip_in``)."""
    installed: list[str] = []
    for host, guest, names in programs:
        if not os.path.isfile(host):
            _log(f"warning: {host} not installed, not in the guest")
            continue
        files = [(host, guest), *((lib, lib) for lib in _shared_libs(host))]
        for src, dst in files:
            rel = dst.lstrip("/")
            if skip_in is not None and (skip_in / rel).exists():
                continue
            _copy_file(Path(src), tree / rel)
        for name in names:
            link = tree / Path(guest).parent.relative_to("/") / name
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to(Path(guest).name)
        installed.append(guest)
    return installed


# --------------------------------------------------------------------------- cpio


@dataclasses.dataclass
class _CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _tree_entries(tree: Path) -> Iterator[_CpioEntry]:
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        base = Path(dirpath)
        rel_dir = base.relative_to(tree)
        if str(rel_dir) != ".":
            yield _CpioEntry(str(rel_dir), stat.S_IFDIR | 0o755)
        for name in sorted(filenames + [d for d in dirnames if (base / d).is_symlink()]):
            path = base / name
            rel = str(path.relative_to(tree))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                yield _CpioEntry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                yield _CpioEntry(rel, stat.S_IFREG | (st.st_mode & 0o777), path.read_bytes())


def _cpio(entries: Iterable[_CpioEntry]) -> bytes:
    """A cpio "newc" archive (uid/gid 0, mtime 0: reproducible), not compressed: the
    kernel then copies it instead of inflating it, 0.5-2 s less per boot under TCG
    (the fio archive is 36 MiB gzip'ed, 96 MiB as is) for more bytes on disk."""
    chunks: list[bytes] = []
    ino = 1

    def add(name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        nonlocal ino
        raw_name = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        chunks.append(header + raw_name)
        chunks.append(b"\0" * (-(len(header) + len(raw_name)) % 4))
        chunks.append(data)
        chunks.append(b"\0" * (-len(data) % 4))
        ino += 1

    for e in entries:
        add(e.name, e.mode, e.data, e.rdev)
    add("TRAILER!!!", 0, b"", (0, 0))
    raw = b"".join(chunks)
    return raw + b"\0" * (-len(raw) % 512)


# --------------------------------------------------------------------------- /init

#: The guest's /init.  Protocol (see virtio.testing.qemu):
#:
#: - script mode: fw_cfg file ``opt/pyvirtio/script`` exists -> run it with sh,
#:   framed by ``@@PYVIRTIO-BEGIN <nonce>@@`` and ``@@PYVIRTIO-EXIT <nonce> <rc>@@``,
#:   then power off;
#: - interactive mode: print ``@@PYVIRTIO-READY <nonce>@@``, then read lines
#:   ``@@P <id> <base64 part>`` (zero or more) and ``@@C <id> <base64 last part>``
#:   from the serial port, source each script in this (persistent) shell with stdin
#:   from /dev/null, framed by ``@@PYVIRTIO-BEGIN <id>@@`` and
#:   ``@@PYVIRTIO-DONE <id> <rc>@@``.
#:
#: ``<nonce>`` comes from fw_cfg ``opt/pyvirtio/nonce`` (so a script that prints
#: marker-like text cannot fake the end of its own output).
#:
#: The serial tty is in *canonical* mode (no echo, no signal or flow-control
#: characters, no output processing), so the tty hands ``read`` only whole lines.
#: In raw mode, busybox ash (1.35) loses the part of a line already read when a
#: signal interrupts ``read`` while it waits for the rest: a background job of this
#: shell exiting (SIGCHLD) then swallowed a command.  Canonical mode's line buffer
#: holds 4095 characters; the harness splits longer commands into ``@@P`` parts.
#:
#: The markers are printed from a subshell.  The same SIGCHLD interrupts a builtin
#: ``printf``/``echo`` of this shell blocked writing to the (slow) serial port: ash
#: installs its handlers without SA_RESTART, the write fails with EINTR and the text
#: is lost -- a lost DONE marker left the harness waiting out its timeout.  A child
#: process gets no SIGCHLD from this shell's jobs, so its write completes.  (Output a
#: command's own builtins write from this shell can still be cut that way.)
INIT_SCRIPT = r"""#!/bin/sh
# pyvirtio guest /init (generated by virtio.testing.guest_image; do not edit)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
hostname pyvirtio-guest
ip link set lo up 2>/dev/null
for m in $(cat /etc/pyvirtio/modules); do
    modprobe "$m" 2>/dev/null || echo "pyvirtio-init: modprobe $m failed"
done
FW=/sys/firmware/qemu_fw_cfg/by_name/opt/pyvirtio
nonce=$(cat "$FW/nonce/raw" 2>/dev/null)
if [ -r "$FW/script/raw" ]; then
    cat "$FW/script/raw" > /tmp/pyvirtio-script.sh
    echo "@@PYVIRTIO-BEGIN $nonce@@"
    sh /tmp/pyvirtio-script.sh </dev/null
    rc=$?
    printf '\n@@PYVIRTIO-EXIT %s %d@@\n' "$nonce" "$rc"
    sync
    poweroff -f
    exit 0
fi
stty -F /dev/ttyS0 raw -echo icanon 2>/dev/null
exec 0</dev/ttyS0 1>/dev/ttyS0 2>&1
echo "@@PYVIRTIO-READY $nonce@@"
: > /tmp/.pyvirtio-cmd.b64
while IFS= read -r __pv_line; do
    case "$__pv_line" in
        "@@P "*|"@@C "*) ;;
        *) continue ;;
    esac
    set -- $__pv_line
    printf '%s' "$3" >> /tmp/.pyvirtio-cmd.b64
    [ "$1" = "@@C" ] || continue
    __pv_id=$2
    base64 -d < /tmp/.pyvirtio-cmd.b64 > /tmp/.pyvirtio-cmd
    : > /tmp/.pyvirtio-cmd.b64
    ( echo "@@PYVIRTIO-BEGIN $__pv_id@@" )
    . /tmp/.pyvirtio-cmd </dev/null
    __pv_rc=$?
    ( printf '\n@@PYVIRTIO-DONE %s %d@@\n' "$__pv_id" "$__pv_rc" )
done
echo "pyvirtio-init: console closed"
poweroff -f
"""


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m virtio.testing.guest_image",
        description="Build (or reuse) the cached QEMU guest kernel + initramfs.",
    )
    p.add_argument("--out", type=Path, help="build into DIR instead of the cache")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    p.add_argument(
        "--latest",
        action="store_true",
        help="build for the kernel apt offers now even if another one is cached",
    )
    p.add_argument("--no-fio", action="store_true", help="skip initrd-fio.img")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if a cached image exists, 1 otherwise; build nothing",
    )
    p.add_argument("--print", action="store_true", help="print the manifest as JSON")
    args = p.parse_args(argv)
    fio = not args.no_fio
    try:
        if args.check:
            image = find_cached_image()
            if image is None or (fio and image.initrd_fio is None):
                return 1
        elif args.out is not None or args.rebuild or args.latest:
            image = build_image(args.out, fio=fio, rebuild=args.rebuild)
        else:
            image = ensure_image(fio=fio)
    except GuestImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print:
        print(json.dumps({**image.manifest, "directory": str(image.directory)}, indent=2))
    else:
        print(image.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
