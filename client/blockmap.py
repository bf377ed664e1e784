"""Block maps: a strong hash per fixed-size block of a blob, so a lazy reader can verify the
few blocks it reads without hashing the whole blob first.

A map is made by whoever hashes the content anyway (the blob backend while it copies an
upload in: the embedded store and a server with a blob directory), stored by the registry
keyed by (entity, blob md5), and checked by the mount before a block is served.  The block
size is the mount's fetch block (1 MiB), so one fetched block is one hash.

Wire/disk form (``to_bytes``): ``b"afbm1"`` + size (u64) + block size (u32) + 32 bytes per
block (sha256).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

BLOCK_SIZE = 1 << 20
_DIGEST = 32
_MAGIC = b"afbm1"
_HEADER = struct.Struct("<QI")


class BlockMismatchError(Exception):
    """A block's bytes do not match its block map entry (never serve them)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def nblocks(size: int, block_size: int) -> int:
    return -(-size // block_size)


@dataclass(frozen=True)
class BlockMap:
    size: int  #: the blob's size in bytes (also what the map was made from)
    block_size: int
    hashes: bytes  #: sha256 of each block, concatenated

    def __post_init__(self) -> None:
        if self.block_size <= 0 or len(self.hashes) != _DIGEST * nblocks(self.size, self.block_size):
            raise ValueError(f"block map for {self.size} bytes has {len(self.hashes)} hash bytes")

    @property
    def count(self) -> int:
        return nblocks(self.size, self.block_size)

    def block_len(self, i: int) -> int:
        return min(self.block_size, self.size - i * self.block_size)

    def check(self, i: int, data: bytes | memoryview) -> bool:
        """Whether ``data`` is exactly block ``i`` (length and sha256)."""
        if not 0 <= i < self.count or len(data) != self.block_len(i):
            return False
        return hashlib.sha256(data).digest() == self.hashes[i * _DIGEST:(i + 1) * _DIGEST]

    def to_bytes(self) -> bytes:
        return _MAGIC + _HEADER.pack(self.size, self.block_size) + self.hashes

    @classmethod
    def from_bytes(cls, raw: bytes) -> BlockMap:
        if not raw.startswith(_MAGIC) or len(raw) < len(_MAGIC) + _HEADER.size:
            raise ValueError("not a block map")
        size, block_size = _HEADER.unpack_from(raw, len(_MAGIC))
        return cls(size, block_size, bytes(raw[len(_MAGIC) + _HEADER.size:]))


class BlockHasher:
    """Feed a blob's bytes in order (any chunking); ``result()`` is its block map."""

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.reset()

    def reset(self) -> None:
        """Start over (the same bytes will be fed again)."""
        self._cur = hashlib.sha256()
        self._fill = 0
        self._size = 0
        self._out = bytearray()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._size += len(view)
        while view:
            take = min(self.block_size - self._fill, len(view))
            self._cur.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == self.block_size:
                self._out += self._cur.digest()
                self._cur, self._fill = hashlib.sha256(), 0

    def result(self) -> BlockMap:
        out = bytes(self._out) + (self._cur.digest() if self._fill else b"")
        return BlockMap(self._size, self.block_size, out)


def wants_map(size: int, block_size: int = BLOCK_SIZE) -> bool:
    """Maps are kept for blobs of more than one block (smaller ones are verified whole)."""
    return size > block_size
