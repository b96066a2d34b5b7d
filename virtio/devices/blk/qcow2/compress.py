"""Compressed clusters, for reading (qcow2.rst "Compressed Clusters Descriptor",
header field ``compression_type``).

deflate clusters are raw RFC 1951 streams (no zlib header); zstd clusters are
zstd frames, decompressed with the system's libzstd through cffi (ABI mode, no
compiler).  Either way decompression stops when one cluster has been produced:
the stored length is rounded up to 512-byte sectors and the tail may belong to
the next compressed cluster.
"""

from __future__ import annotations

import zlib

from virtio.devices.blk.qcow2.header import COMPRESSION_DEFLATE, COMPRESSION_ZSTD, Qcow2FormatError

_ZSTD_CDEF = """
    typedef struct { const void *src; size_t size; size_t pos; } ZSTD_inBuffer;
    typedef struct { void *dst; size_t size; size_t pos; } ZSTD_outBuffer;
    typedef struct ZSTD_DCtx_s ZSTD_DCtx;
    ZSTD_DCtx *ZSTD_createDCtx(void);
    size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx);
    size_t ZSTD_decompressStream(ZSTD_DCtx *zds, ZSTD_outBuffer *output, ZSTD_inBuffer *input);
    unsigned ZSTD_isError(size_t code);
    const char *ZSTD_getErrorName(size_t code);
"""
_ffi = None
_zstd = None


def _libzstd():
    """libzstd, loaded at the first zstd cluster (the cdef is parsed then, not when
    every qcow2 image is opened)."""
    global _ffi, _zstd
    if _zstd is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(_ZSTD_CDEF)
        try:
            lib = ffi.dlopen("libzstd.so.1")
        except OSError as exc:
            raise Qcow2FormatError(
                f"zstd-compressed cluster, but libzstd is missing: {exc}"
            ) from None
        _ffi = ffi  # before _zstd: another thread that sees _zstd uses _ffi
        _zstd = lib
    return _zstd


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte length) of a compressed cluster's data (descriptor bits
    0..x-1 are the offset, x..61 the number of additional 512-byte sectors)."""
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * 512 - (offset & 511)


def decompress(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """One cluster from its compressed ``data``; raises ``Qcow2FormatError``."""
    if compression_type == COMPRESSION_DEFLATE:
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(data, cluster_size)
        except zlib.error as exc:
            raise Qcow2FormatError(f"corrupt deflate cluster: {exc}") from None
    elif compression_type == COMPRESSION_ZSTD:
        out = _zstd_decompress(data, cluster_size)
    else:
        raise Qcow2FormatError(f"unknown compression type {compression_type}")
    if len(out) != cluster_size:
        raise Qcow2FormatError(
            f"compressed cluster decompressed to {len(out)} bytes, not {cluster_size}"
        )
    return out


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
    lib = _libzstd()
    dctx = lib.ZSTD_createDCtx()
    if dctx == _ffi.NULL:
        raise MemoryError("ZSTD_createDCtx")
    try:
        src = _ffi.from_buffer(data)
        dst = _ffi.new("char[]", cluster_size)
        inb = _ffi.new("ZSTD_inBuffer *", {"src": src, "size": len(data), "pos": 0})
        outb = _ffi.new("ZSTD_outBuffer *", {"dst": dst, "size": cluster_size, "pos": 0})
        # Several frames may follow each other; stop once the cluster is full.
        while outb.pos < cluster_size and inb.pos < inb.size:
            ret = lib.ZSTD_decompressStream(dctx, outb, inb)
            if lib.ZSTD_isError(ret):
                name = _ffi.string(lib.ZSTD_getErrorName(ret)).decode()
                raise Qcow2FormatError(f"corrupt zstd cluster: {name}")
            if ret == 0 and outb.pos < cluster_size and inb.pos >= inb.size:
                break
        return bytes(_ffi.buffer(dst, outb.pos))
    finally:
        lib.ZSTD_freeDCtx(dctx)
