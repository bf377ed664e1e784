#!/usr/bin/env python3
"""bench/floorfs.py — the request floor: a minimal read-only pyfuse3 + trio filesystem.

It serves directory trees from memory (every file's bytes and every attribute built once at
start), answering only lookup, getattr, opendir, readdir, releasedir, open, read, release and
forget, each without I/O or locks.  Whatever a request-bound workload (warm small files,
``find``, ``ls -lR``) costs on it is what pyfuse3 itself costs on this machine: bench/mount_read
prints the real mount's times against it ("vs pyfuse3 floor").

The kernel options that change which requests are sent match the real mount
(mountfs/daemon.py, mountfs/ops.py): ``pyfuse3.default_options`` (default_permissions),
``noatime``, entry and attr timeouts of 86400 s (the daemon's default ``attr_timeout``
for immutable version nodes), ``keep_cache`` on open, readdir answered with attributes
(pyfuse3 replies READDIRPLUS).  Not matched, on purpose (they are what a floor leaves out):
flush, getxattr and listxattr answer ENOSYS, which the kernel remembers and stops sending;
no readahead tuning (it only matters for files larger than 128 KiB); mounted ``ro`` (the bench's
real mount is writable for drafts, which no read request depends on).

Usage:  .venv/bin/python bench/floorfs.py MOUNTPOINT NAME=DIR [NAME=DIR ...]
        (serves DIR as MOUNTPOINT/NAME; unmount with ``fusermount3 -u MOUNTPOINT``)
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

TIMEOUT = 86400.0  #: entry/attr timeout, as the real mount's version nodes
BLKSIZE = 1 << 20  #: st_blksize, as mountfs/ops.py


@dataclass
class Node:
    attr: pyfuse3.EntryAttributes
    data: bytes = b""
    names: list[bytes] = field(default_factory=list)  #: directory entries, sorted
    children: dict[bytes, int] = field(default_factory=dict)  #: name -> inode


class FloorFS(pyfuse3.Operations):
    """Read-only trees from memory; inode ``n`` is ``self.nodes[n]``."""

    def __init__(self, trees: dict[str, Path]) -> None:
        super().__init__()
        self.now_ns = time.time_ns()
        self.nodes: dict[int, Node] = {}
        root = self._add(stat.S_IFDIR | 0o555, 0)
        for name, path in sorted(trees.items()):
            self._link(root, os.fsencode(name), self._load(path))
        self._finish()

    def _add(self, mode: int, size: int, data: bytes = b"") -> int:
        inode = pyfuse3.ROOT_INODE + len(self.nodes)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode = mode
        a.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_size = size
        a.st_blksize = BLKSIZE
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.now_ns
        self.nodes[inode] = Node(a, data)
        return inode

    def _link(self, parent: int, name: bytes, inode: int) -> None:
        p = self.nodes[parent]
        p.children[name] = inode
        if stat.S_ISDIR(self.nodes[inode].attr.st_mode):
            p.attr.st_nlink += 1

    def _load(self, path: Path) -> int:
        if path.is_dir():
            inode = self._add(stat.S_IFDIR | 0o555, 0)
            for child in path.iterdir():
                self._link(inode, os.fsencode(child.name), self._load(child))
            return inode
        data = path.read_bytes()
        return self._add(stat.S_IFREG | 0o444, len(data), data)

    def _finish(self) -> None:
        for node in self.nodes.values():
            node.names = sorted(node.children)

    def _node(self, inode: int) -> Node:
        try:
            return self.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def lookup(self, inode_p: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        child = self._node(inode_p).children.get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.nodes[child].attr

    async def forget(self, inode_list: object) -> None:
        return None  # inodes live as long as the mount

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._node(inode).attr

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if not stat.S_ISDIR(self._node(inode).attr.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self.nodes[fh]
        for i in range(start_id, len(node.names)):
            name = node.names[i]
            if not pyfuse3.readdir_reply(token, name, self.nodes[node.children[name]].attr, i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not stat.S_ISREG(self._node(inode).attr.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.nodes[fh].data[off:off + size]

    async def release(self, fh: int) -> None:
        return None


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print(__doc__.split("\n\n")[-1].strip(), file=sys.stderr)
        return 2
    mountpoint = argv[0]
    trees = {name: Path(d) for name, d in (a.split("=", 1) for a in argv[1:])}
    fs = FloorFS(trees)
    options = set(pyfuse3.default_options) | {"fsname=floorfs", "subtype=floorfs", "noatime", "ro"}

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(serve)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
