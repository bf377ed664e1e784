"""The pyfuse3 Operations of the mount: argument conversion only, errno mapping in one place.

Everything with a decision in it lives below: :mod:`mountfs.namespace` (what a name means,
attributes, lookup counts, handles), :mod:`mountfs.fetch` (content) and
:mod:`mountfs.drafts.fs` (the writable drafts; every write operation goes there, which answers
EROFS outside a draft).  Draft operations run in a worker thread: a commit holds the
draft's lock for as long as it takes, and the loop must keep serving everything else.  The
exceptions are the per-handle calls of a copy (write into a staged file, flush, release), which
the draft layer answers on the loop when its lock is free and nothing else is needed
(``*_nowait``); otherwise they go to a thread like the rest.  Calls that may block
(store requests, index builds, fetches, verification) run in worker threads through
``trio.to_thread`` under one CapacityLimiter, so the trio loop keeps serving other requests.
Each call is first tried on the loop in local-only mode (memory, open SQLite indexes, local
cache reads); only when the layer below says it needs I/O (NeedsIO / None) is it repeated in
a thread.  A thread hop costs ~0.5 ms on a small box, which is what `find` over 100k
files or a warm 128 KiB read would otherwise pay per request.

Trio rule: code between two ``await``s is atomic with respect to other FUSE requests; the
namespace has its own lock because its methods also run in worker threads.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NewType, ParamSpec, TypeVar

import pyfuse3
import trio

from .drafts.fs import COMMIT_XATTR, DraftFS
from .errors import errno_for
from .content import ContentReader, Handle
from .namespace import DRAFT_KINDS, VERSIONED, Attr, Namespace, NeedsIO, Node

log = logging.getLogger(__name__)

FileHandle = NewType("FileHandle", int)
DirHandle = NewType("DirHandle", int)
_P = ParamSpec("_P")
_T = TypeVar("_T")
_READDIR_PAGE = 256
#: st_blksize: cp, cat, dd and stdio size their buffers from it; 1 MiB (= max_write, the
#: largest FUSE write libfuse negotiates) makes ``cp`` into a draft send 1 MiB writes instead
#: of 128 KiB ones: an eighth of the write requests (each also costs the kernel's
#: security.capability getxattr).
_BLKSIZE = 1 << 20
_NAME_MAX = 255


def _fuse_errors(fn: Callable[_P, Coroutine[Any, Any, _T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Turn any exception of a handler into the FUSEError the kernel understands."""

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        counts, errors = args[0].requests, args[0].errors  # type: ignore[attr-defined]
        counts[name] = counts.get(name, 0) + 1
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            errors[exc.errno] = errors.get(exc.errno, 0) + 1
            raise
        except Exception as exc:  # trio.Cancelled is a BaseException and passes through
            code = errno_for(exc)
            errors[code] = errors.get(code, 0) + 1
            if code == errno.EIO:
                log.warning("%s -> EIO: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(code) from exc

    return wrapper


def entry_attributes(a: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.inode
    e.generation = 0
    e.entry_timeout = a.entry_timeout
    e.attr_timeout = a.attr_timeout
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = 0
    e.st_size = a.size
    e.st_blksize = _BLKSIZE
    e.st_blocks = (a.size + 511) // 512
    e.st_mtime_ns = a.mtime_ns
    e.st_atime_ns = a.mtime_ns if a.atime_ns is None else a.atime_ns
    e.st_ctime_ns = a.mtime_ns if a.ctime_ns is None else a.ctime_ns
    return e


def _name(name: bytes) -> str:
    """A name argument: ENAMETOOLONG over NAME_MAX bytes (the kernel leaves that to us)."""
    if len(name) > _NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
    return os.fsdecode(name)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, ns: Namespace, content: ContentReader, max_threads: int = 16,
                 drafts: DraftFS | None = None) -> None:
        super().__init__()
        self.ns = ns
        self.content = content
        self.drafts = drafts
        self.max_threads = max_threads
        self._limiter: trio.CapacityLimiter | None = None
        self._handles: dict[int, Handle] = {}
        #: FUSE requests served, per operation (shown in the root's ``user.artifactfs.stats``
        #: as ``requests``, so tests can count what the kernel sends for find / ls / cp)
        self.requests: dict[str, int] = {}
        #: error replies by errno (``artifactfs_mount_fuse_errors_total``, mountfs/metrics.py)
        self.errors: dict[int, int] = {}
        #: called once the kernel's INIT has been answered (the daemon tunes the mount then)
        self.on_init: Callable[[], None] | None = None
        #: called once, on the loop, before the first open is answered: the kernel fixes a
        #: file's readahead when it opens it (after our reply), so the daemon raises the
        #: mount's readahead here and no file is ever read with the 128 KiB default
        self.before_first_open: Callable[[], None] | None = None

    def init(self) -> None:
        if self.on_init is not None:
            self.on_init()

    async def _thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._limiter is None:  # created lazily: it must belong to the running trio loop
            self._limiter = trio.CapacityLimiter(self.max_threads)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _writable(self) -> DraftFS:
        if self.drafts is None:
            raise OSError(errno.EROFS, "artifact versions are read-only")
        return self.drafts

    async def _draft(self, fn: Callable[..., _T], *args: Any) -> _T:
        """A draft operation: always in a worker thread (it may wait for a running commit)."""
        return await self._thread(fn, *args)

    def _reply(self, node: Any) -> pyfuse3.EntryAttributes:
        """Entry reply of a node just made (mkdir/create/mknod): counts as one lookup."""
        self.ns.remember(node)
        return entry_attributes(self.ns.attr(node))

    async def _ns(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a namespace call on the loop if it is answerable from memory, else in a thread."""
        try:
            return self.ns.run_local(fn, *args)
        except NeedsIO:
            return await self._thread(fn, *args)

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """The reply attributes of ``node``; an immutable node's are built once and reused
        (pyfuse3 copies them into every reply, as bench/floorfs.py relies on too)."""
        reply = node.reply
        if reply is None:
            reply = entry_attributes(self.ns.attr(node))
            if node.kind in VERSIONED:
                node.reply = reply
        return reply

    # -- namespace -----------------------------------------------------------------------
    @_fuse_errors
    async def lookup(self, inode_p: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self._ns(self.ns.lookup, inode_p, _name(name)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.requests["forget"] = self.requests.get("forget", 0) + 1
        for inode, nlookup in inode_list:
            self.ns.forget(inode, nlookup)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        node = self.ns.node(inode)
        if node.kind in DRAFT_KINDS:  # mutable: the draft's current attributes
            return entry_attributes(await self._ns(self.ns.getattr, inode))
        return self._entry(node)

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> DirHandle:
        return DirHandle(self.ns.opendir(inode))

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        page = await self._ns(self.ns.readdir_page, fh, start_id, _READDIR_PAGE)
        reply, entry, fsencode = pyfuse3.readdir_reply, self._entry, os.fsencode
        while page:
            accepted: list[Node] = []
            for next_id, name, node in page:
                if not reply(token, fsencode(name), entry(node), next_id):
                    self.ns.remember_all(accepted)
                    self.ns.release_unreferenced(node)
                    return
                if name != "." and name != "..":  # the kernel takes no reference on dot entries
                    accepted.append(node)
            self.ns.remember_all(accepted)  # one lock round per page, no await in between
            if len(page) < _READDIR_PAGE:
                return
            page = await self._ns(self.ns.readdir_page, fh, page[-1][0], _READDIR_PAGE)

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.ns.releasedir(fh)

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_namemax = 255
        if self.drafts is not None:  # what drafts can still take: the staging filesystem
            fs = await self._draft(self.drafts.statfs)
            st.f_bsize, st.f_frsize = fs.bsize, fs.frsize
            st.f_blocks, st.f_bfree, st.f_bavail = fs.blocks, fs.bfree, fs.bavail
            st.f_files, st.f_ffree, st.f_favail = fs.files, fs.ffree, fs.ffree
            return st
        st.f_bsize = st.f_frsize = 1 << 17
        st.f_blocks = st.f_bfree = st.f_bavail = 0
        st.f_files = len(self.ns)
        st.f_ffree = st.f_favail = 0
        return st

    # -- xattrs --------------------------------------------------------------------------
    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._ns(self.ns.getxattr, inode, os.fsdecode(name))

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in await self._ns(self.ns.xattrs, inode)]

    # -- files ---------------------------------------------------------------------------
    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.before_first_open is not None:
            hook, self.before_first_open = self.before_first_open, None
            hook()
        if self.ns.node(inode).kind in DRAFT_KINDS:
            fh, ref = await self._draft(self._writable().open, inode, flags)
            if ref is not None:  # unchanged base content: the read side serves it
                self._handles[fh] = self.content.open(ref)
            return pyfuse3.FileInfo(fh=FileHandle(fh), keep_cache=False)
        fh, ref = await self._ns(self.ns.open, inode, flags)
        assert ref is not None  # a version's file is always pinned to content
        try:
            self._handles[fh] = self.content.open(ref)
        except BaseException:
            self.ns.release(fh)  # the kernel sends no release for an open that failed
            raise
        # Content under an inode never changes, so the kernel may keep its page cache.
        return pyfuse3.FileInfo(fh=FileHandle(fh), keep_cache=True)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]  # pyfuse3 takes any buffer (its stub says bytes)
        handle = self._handles.get(fh)
        if handle is None:
            return await self._draft(self._writable().read, fh, off, size)
        data = self.content.read_nowait(handle, off, size)
        if data is None:
            data = await self._thread(self.content.read, handle, off, size)
        return data

    @_fuse_errors
    async def flush(self, fh: int) -> None:
        # close(2) of ``.commit`` commits and waits; other draft files and versions: nothing to do
        if self.drafts is None:
            # A mount without drafts (read-only) has nothing to flush: ENOSYS, and the kernel
            # stops sending FLUSH for good, a third of the requests of a warm small file.
            # (pyfuse3 3.5 cannot set FOPEN_NOFLUSH per file, which a writable mount needs.)
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if fh not in self._handles and self.drafts.is_draft_handle(fh):
            if not self.drafts.flush_nowait(fh):
                await self._draft(self.drafts.flush, fh)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        self.ns.release(fh)
        handle = self._handles.pop(fh, None)
        if handle is not None and not self.content.close_nowait(handle):
            await self._thread(self.content.close, handle)
        if self.drafts is not None and self.drafts.is_draft_handle(fh) and not self.drafts.release_nowait(fh):
            await self._draft(self.drafts.release, fh)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.drafts is not None and self.drafts.is_draft_handle(fh):
            await self._draft(self.drafts.fsync, fh, datasync)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode = self.ns.dir_inode(fh)
        if self.ns.node(inode).kind in DRAFT_KINDS:
            await self._draft(self._writable().fsyncdir, inode)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self.ns.node(inode).kind in DRAFT_KINDS:
            return os.fsencode(await self._draft(self._writable().readlink, inode))
        return os.fsencode(self.ns.readlink(inode))

    # -- writes: drafts take them (mountfs.drafts.fs), anything else answers EROFS ------------
    @_fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self._draft(
            functools.partial(self._writable().setattr, inode,
                              size=attr.st_size if fields.update_size else None,
                              mode=attr.st_mode if fields.update_mode else None,
                              atime_ns=attr.st_atime_ns if fields.update_atime else None,
                              mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                              chown=fields.update_uid or fields.update_gid))
        return entry_attributes(self.ns.attr(node))

    @_fuse_errors
    async def mkdir(self, inode_p: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._reply(await self._draft(self._writable().mkdir, inode_p, _name(name), mode))

    @_fuse_errors
    async def mknod(self, inode_p: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._reply(await self._draft(self._writable().mknod, inode_p, _name(name), mode))

    @_fuse_errors
    async def create(self, inode_p: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, node = await self._draft(self._writable().create, inode_p, _name(name), mode, flags)
        return pyfuse3.FileInfo(fh=FileHandle(fh), keep_cache=False), self._reply(node)

    @_fuse_errors
    async def symlink(self, inode_p: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._reply(await self._draft(self._writable().symlink, inode_p, _name(name),
                                             os.fsdecode(target)))

    @_fuse_errors
    async def link(self, inode: int, new_inode_p: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._reply(await self._draft(self._writable().link, inode, new_inode_p, _name(new_name)))

    @_fuse_errors
    async def unlink(self, inode_p: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._draft(self._writable().unlink, inode_p, _name(name))

    @_fuse_errors
    async def rmdir(self, inode_p: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._draft(self._writable().rmdir, inode_p, _name(name))

    @_fuse_errors
    async def rename(self, inode_p_old: int, name_old: bytes, inode_p_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self._draft(self._writable().rename, inode_p_old, _name(name_old), inode_p_new,
                          _name(name_new), flags)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        n = self._writable().write_nowait(fh, off, buf)
        return n if n is not None else await self._draft(self._writable().write, fh, off, buf)

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self.drafts is not None and name == COMMIT_XATTR.encode():  # `artifactfs commit`
            await self._draft(self.drafts.commit_xattr, inode, value)
            return
        self.ns.check_writable(inode)

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.ns.check_writable(inode)
