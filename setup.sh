#!/usr/bin/env bash
# pyvirtio: bring a Debian 12 machine (root) to a working state, idempotently.
#
#   ./setup.sh                  set up only
#   ./setup.sh test [ARGS...]   set up, then: .venv/bin/python -m pytest ARGS...
#   ./setup.sh run [ARGS...]    set up, then: .venv/bin/virtio bench ARGS...
#
# Steps (each skipped when already done, so a second run takes about a second):
#   1. Debian packages (apt-get update only when something is missing);
#   2. .venv with `pip install -e '.[test,emulator]'` (redone when pyproject.toml changes);
#   3. the QEMU guest image (kernel + initramfs) in ${PYVIRTIO_CACHE:-~/.cache/pyvirtio}/guest;
#   4. QEMU 10.0 from bookworm-backports, downloaded (apt-get download, with a private apt
#      list of bookworm-backports only: the system's sources are left alone) and unpacked
#      (dpkg -x) into ${PYVIRTIO_CACHE:-~/.cache/pyvirtio}/qemu-10.0, beside the system's
#      QEMU 7.2: the integration tests run real guests on both versions.
#
# Environment:
#   PYVIRTIO_NO_APT=1      never run apt-get (dev machines that have the tools already)
#   PYVIRTIO_NO_IMAGE=1    do not build the guest image
#   PYVIRTIO_NO_QEMU10=1   do not fetch QEMU 10.0 (tests needing it skip, saying so)
#   PYVIRTIO_CACHE=DIR     cache directory (default ~/.cache/pyvirtio)
#   PYTHON=python3         interpreter used to create .venv
# Progress goes to stderr; works with CI=true and no stdin.
set -euo pipefail

# ---------------------------------------------------------------------------
# Debian packages the project needs.  >>> Extend this list for new needs. <<<
#   gcc libc6-dev linux-libc-dev   cffi's native code (virtio.native)
#   qemu-system-x86                qemu-system-x86_64 (guests for integration tests)
#   qemu-system-common             qemu-storage-daemon (reference vhost-user-blk backend)
#   qemu-utils                     qemu-img, qemu-nbd
#   busybox-static kmod cpio       guest initramfs (busybox, depmod, modprobe)
#   e2fsprogs fio                  copied into the guest (mkfs.ext4/e2fsck, fio)
#   nbdkit                         second NBD server for the NBD client tests (memory/file, error/delay)
#   dpdk-dev                       dpdk-testpmd: vhost PMD (net anchor) and virtio-user (VM-less net peer)
#   valgrind                       callgrind: bench/net_dataplane_cpu.py --instructions (work per frame,
#                                  the same figure however fast the machine runs that day)
PYVIRTIO_APT_PACKAGES=(
    gcc
    libc6-dev
    linux-libc-dev
    qemu-system-x86
    qemu-system-common
    qemu-utils
    busybox-static
    kmod
    cpio
    e2fsprogs
    fio
    liburing-dev
    libgnutls28-dev
    nbdkit
    evtest
    dpdk-dev
    valgrind
)
# ---------------------------------------------------------------------------

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.pyvirtio-install-stamp"

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root for: $*"
    fi
}

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -q update >&2
        APT_UPDATED=1
    fi
}

apt_lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

missing_packages() {
    # prints the packages of "$@" that are not installed
    local pkg status
    for pkg in "$@"; do
        status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
        [ "$status" = "installed" ] || printf '%s\n' "$pkg"
    done
}

python_needs() {
    # Debian's own python3 lacks venv / headers unless python3-venv / python3-dev are in.
    if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        echo python3-venv
    fi
    if ! "$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' >/dev/null 2>&1; then
        echo python3-dev
    fi
}

step_apt() {
    if [ "${PYVIRTIO_NO_APT:-0}" = "1" ]; then
        log "PYVIRTIO_NO_APT=1: skipping apt"
        return
    fi
    command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script expects Debian 12"
    command -v "$PYTHON" >/dev/null 2>&1 || PYVIRTIO_APT_PACKAGES+=(python3)
    local wanted missing
    mapfile -t wanted < <(printf '%s\n' "${PYVIRTIO_APT_PACKAGES[@]}"; python_needs 2>/dev/null || true)
    mapfile -t missing < <(missing_packages "${wanted[@]}")
    if [ "${#missing[@]}" -eq 0 ]; then
        log "Debian packages: all ${#wanted[@]} installed"
        apt_lists_present || apt_update_once   # the guest image builder needs apt-cache
        return
    fi
    apt_update_once
    log "apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends \
        -o Dpkg::Use-Pty=0 "${missing[@]}" </dev/null >&2
}

step_venv() {
    local want have
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        log "removing broken $VENV"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV ($("$PYTHON" --version 2>&1))"
        "$PYTHON" -m venv "$VENV"
        rm -f "$STAMP"
    fi
    have="$(cat "$STAMP" 2>/dev/null || true)"
    if [ "$have" = "$want" ] && "$VENV/bin/python" -c 'import virtio, pytest, trio' >/dev/null 2>&1; then
        log "venv: up to date"
        return
    fi
    log "pip install -e '.[test,emulator]'"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    "$VENV/bin/python" -m pip install -q --upgrade pip </dev/null >&2
    "$VENV/bin/python" -m pip install -q -e '.[test,emulator]' </dev/null >&2
    printf '%s\n' "$want" >"$STAMP"
}

step_image() {
    if [ "${PYVIRTIO_NO_IMAGE:-0}" = "1" ]; then
        log "PYVIRTIO_NO_IMAGE=1: skipping the guest image"
        return
    fi
    local py="$VENV/bin/python"
    if "$py" -m virtio.testing.guest_image --check >/dev/null 2>&1; then
        log "guest image: cached ($("$py" -m virtio.testing.guest_image 2>/dev/null))"
        return
    fi
    log "building the guest image (~15 s)"
    if "$py" -m virtio.testing.guest_image >&2; then
        return
    fi
    if [ "${PYVIRTIO_NO_APT:-0}" != "1" ] && [ "$APT_UPDATED" -eq 0 ]; then
        log "guest image build failed; refreshing apt lists and retrying once"
        apt_update_once
        "$py" -m virtio.testing.guest_image >&2 && return
    fi
    die "could not build the guest image (see above)"
}

QEMU10_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data)
QEMU10_VERSION="1:10.0.2+ds-2+deb13u1~bpo12+1"   # bookworm-backports; bump with the archive

step_qemu10() {
    if [ "${PYVIRTIO_NO_QEMU10:-0}" = "1" ]; then
        log "PYVIRTIO_NO_QEMU10=1: skipping QEMU 10.0"
        return
    fi
    local cache="${PYVIRTIO_CACHE:-$HOME/.cache/pyvirtio}"
    local dest="$cache/qemu-10.0"
    if [ -x "$dest/usr/bin/qemu-system-x86_64" ] && [ "$(cat "$dest/.version" 2>/dev/null)" = "$QEMU10_VERSION" ]; then
        log "QEMU 10.0: cached ($dest)"
        return
    fi
    local work
    work="$(mktemp -d)"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
    cat >"$work/backports.sources" <<EOS
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
    local opts=(-o "Dir::Etc::sourcelist=$work/backports.sources" -o Dir::Etc::sourceparts=/dev/null
        -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
    log "QEMU 10.0: downloading ${QEMU10_PACKAGES[*]} $QEMU10_VERSION from bookworm-backports"
    apt-get -q "${opts[@]}" update >&2 || { rm -rf "$work"; die "apt-get update of bookworm-backports failed"; }
    local pkgs=() p
    for p in "${QEMU10_PACKAGES[@]}"; do pkgs+=("$p=$QEMU10_VERSION"); done
    (cd "$work/debs" && apt-get -q "${opts[@]}" download "${pkgs[@]}" >&2) \
        || { rm -rf "$work"; die "could not download QEMU 10.0 from bookworm-backports"; }
    rm -rf "$dest.new"
    mkdir -p "$dest.new"
    for p in "$work"/debs/*.deb; do dpkg -x "$p" "$dest.new"; done
    printf '%s\n' "$QEMU10_VERSION" >"$dest.new/.version"
    "$dest.new/usr/bin/qemu-system-x86_64" --version >/dev/null \
        || { rm -rf "$work" "$dest.new"; die "the unpacked QEMU 10.0 does not run (missing libraries?)"; }
    rm -rf "$dest" "$work"
    mv "$dest.new" "$dest"
    log "QEMU 10.0: unpacked into $dest"
}

main() {
    local cmd="${1:-setup}"
    case "$cmd" in
        setup | test | run) [ "$#" -gt 0 ] && shift ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
        *) die "unknown command '$cmd' (use: setup, test, run)" ;;
    esac
    step_apt
    step_venv
    step_image
    step_qemu10
    log "ready"
    case "$cmd" in
        test) exec "$VENV/bin/python" -m pytest "$@" ;;
        run) exec "$VENV/bin/virtio" bench "$@" ;;
    esac
}

main "$@"
