"""md5 digests in the two spellings W&B uses: base64 in manifests, hex for blob keys; the
one place that hashes a file, an open descriptor or a stream of chunks."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Callable, Iterable
from typing import Protocol

CHUNK = 1 << 20


def md5_file(path: str | os.PathLike[str]) -> str:
    """md5 hex of a file, read in 1 MiB chunks (hashlib releases the GIL, so threads scale)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def md5_fd(fd: int, size: int | None = None, also: Callable[[bytes], object] | None = None,
           chunk: int = CHUNK) -> str:
    """md5 hex of an open file's first ``size`` bytes (all of it when None), read with pread, so
    the descriptor's offset is untouched.  ``also`` is fed the same bytes (a block-map hasher)."""
    h = hashlib.md5(usedforsecurity=False)
    off = 0
    while size is None or off < size:
        data = os.pread(fd, chunk if size is None else min(chunk, size - off), off)
        if not data:
            break
        h.update(data)
        if also is not None:
            also(data)
        off += len(data)
    return h.hexdigest()


def md5_chunks(chunks: Iterable[bytes], also: Callable[[bytes], object] | None = None) -> str:
    """md5 hex of a stream of chunks (an S3 body); ``also`` is fed the same bytes."""
    h = hashlib.md5(usedforsecurity=False)
    for data in chunks:
        h.update(data)
        if also is not None:
            also(data)
    return h.hexdigest()


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def hex_to_b64(md5_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")


#: the strings ``base64.b64decode(s, validate=True)`` decodes to 16 bytes: 22 digits and "=="
_B64_MD5 = re.compile("[A-Za-z0-9+/]{22}==")


def b64_to_hex(md5_b64: str) -> str:
    """The hex spelling of a base64 md5 (ValueError for anything else).  Once per entry of a
    download, so one match and one C decode, not ``b64decode``'s layers."""
    if _B64_MD5.fullmatch(md5_b64) is None:
        raise ValueError(f"{md5_b64!r} is not a base64 md5 digest")
    return binascii.a2b_base64(md5_b64).hex()


_HEX_DIGITS = "0123456789abcdef"


def is_md5_hex(text: str) -> bool:
    return len(text) == 32 and not text.strip(_HEX_DIGITS)  # nothing left: every character a hex digit


class BytesSink(Protocol):
    """Anything bytes are written to: a binary file, a :class:`HashingWriter`."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


class HashingWriter:
    """Write to ``raw`` while hashing, so content is read exactly once (downloads, copies);
    ``on_chunk(n)`` is told each write's length (progress; it may raise to stop the copy)."""

    def __init__(self, raw: BytesSink | None = None, on_chunk: Callable[[int], None] | None = None) -> None:
        self.raw = raw
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0
        self.on_chunk = on_chunk

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.md5.update(data)
        self.size += len(data)
        n = self.raw.write(data) if self.raw is not None else len(data)
        if self.on_chunk is not None:
            self.on_chunk(len(data))
        return n

    def hexdigest(self) -> str:
        return self.md5.hexdigest()
