"""Errors below ``mountfs/ops.py`` say what happened; ``mountfs.errors.errno_for`` alone says which errno.

Two checks: an AST scan that fails when a module of ``client`` or ``mountfs`` (``ops.py`` aside)
builds an errno-carrying error itself (``OSError(errno.X, ...)``, ``FUSEError(...)``, any call
given an ``errno.X``), and the table itself, class by class.
"""

from __future__ import annotations

import ast
import errno
import inspect
import sqlite3
from pathlib import Path

import pytest

from client import errors as client_errors
from mountfs import errors
from mountfs.errors import errno_for

ROOT = Path(__file__).resolve().parent.parent
#: the errno layer itself
ERRNO_LAYER = {"mountfs/ops.py"}
#: (file, function) that may build an OSError from an errno, and why
ALLOWED = {
    # re-raises the OS's own bind error (its errno) with the address in the message; the CLI
    # prints it at startup, no FUSE request is involved
    ("mountfs/metrics.py", "check_address"),
    ("mountfs/metrics.py", "__init__"),
    # a short pwrite is what a full disk gives: the OS's ENOSPC, caught by errno where the
    # cache is written (content.py, cache.py), never answered to the kernel as such
    ("client/atomic.py", "write_fully"),
    # mount(2)/umount2(2) through ctypes: the OS's own errno as os.* functions raise it; the
    # fast path logs it and keeps the FUSE path serving (never a reply to the kernel)
    ("mountfs/fastpath.py", "_check"),
}
_OS_ERRORS = {"OSError", "IOError", "EnvironmentError", "FUSEError"}


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _is_errno(node: ast.expr) -> bool:
    """``errno.X`` or an ``.errno`` attribute (``exc.errno``)."""
    return isinstance(node, ast.Attribute) and (
        node.attr == "errno" or (isinstance(node.value, ast.Name) and node.value.id == "errno"))


class _Scan(ast.NodeVisitor):
    """Calls that build an errno-carrying error, with the innermost function around each."""

    def __init__(self, rel: str) -> None:
        self.rel, self.where, self.found = rel, "<module>", []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.where = self.where, node.name
        self.generic_visit(node)
        self.where = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        if _name(node.func) in _OS_ERRORS or any(_is_errno(a) for a in node.args[:1]):
            if (self.rel, self.where) not in ALLOWED:
                self.found.append(f"{self.rel}:{node.lineno} {self.where}")
        self.generic_visit(node)


def errno_raisers(root: Path = ROOT) -> list[str]:
    """``file:line function`` of every errno-carrying error built outside the errno layer."""
    found: list[str] = []
    for pkg in ("client", "mountfs"):
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in ERRNO_LAYER:
                continue
            scan = _Scan(rel)
            scan.visit(ast.parse(path.read_text(encoding="utf-8"), rel))
            found += scan.found
    return found


def test_nothing_below_ops_raises_an_errno() -> None:
    assert errno_raisers() == []


def test_the_scan_finds_errno_raisers(tmp_path: Path) -> None:
    """The scan is not vacuous: each way of carrying an errno is found, ops.py is left alone."""
    for rel, text in {
        "client/__init__.py": "",
        "mountfs/ops.py": "import errno\ndef f():\n    raise OSError(errno.EROFS, 'x')\n",
        "mountfs/a.py": "import errno\ndef g():\n    raise OSError(errno.ENOENT, 'x')\n",
        "mountfs/b.py": "import errno, pyfuse3\ndef h():\n    raise pyfuse3.FUSEError(errno.EIO)\n",
        "mountfs/c.py": "import errno\ndef _err(code, m):\n    return OSError(code, m)\n"
                        "def k():\n    raise _err(errno.EPERM, 'x')\n",
        "mountfs/d.py": "from mountfs.errors import NotEmptyError\ndef m():\n    raise NotEmptyError('x')\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert errno_raisers(tmp_path) == ["mountfs/a.py:3 g", "mountfs/b.py:3 h", "mountfs/c.py:3 _err",
                                       "mountfs/c.py:5 k"]


def _mount_errors() -> list[type[errors.MountError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, errors.MountError) and c is not errors.MountError]


def test_every_mount_error_has_its_errno_and_a_stdlib_type() -> None:
    assert len(_mount_errors()) >= 15
    for cls in _mount_errors():
        assert cls in errors.ERRNO, cls
        assert issubclass(cls, client_errors.ArtifactFSError)
        assert cls.__mro__[2:] != (client_errors.ArtifactFSError, Exception, BaseException, object), cls
        assert client_errors.error_from_code(cls.__name__, "m").__class__ is cls  # a wire code like the rest


@pytest.mark.parametrize("exc, code", [
    (errors.InvalidArgumentError("m"), errno.EINVAL),
    (errors.NameTooLongError("m"), errno.ENAMETOOLONG),
    (errors.NotDirectoryError("m"), errno.ENOTDIR),
    (errors.IsDirectoryError("m"), errno.EISDIR),
    (errors.ExistsError("m"), errno.EEXIST),
    (errors.NotEmptyError("m"), errno.ENOTEMPTY),
    (errors.NotPermittedError("m"), errno.EPERM),
    (errors.ReadOnlyFileError("m"), errno.EACCES),
    (errors.ReadOnlyError("m"), errno.EROFS),
    (errors.BadHandleError("m"), errno.EBADF),
    (errors.CrossDraftError("m"), errno.EXDEV),
    (errors.DraftBusyError("m"), errno.EBUSY),
    (errors.NotSupportedError("m"), errno.ENOTSUP),
    (errors.NoAttributeError("m"), errno.ENODATA),
    (errors.BaseUnavailableError("m"), errno.EIO),
    (errors.CommitFailedError("m"), errno.EIO),
    # the client's classes, most specific first
    (client_errors.NotFoundError("m"), errno.ENOENT),
    (client_errors.InvalidNameError("m"), errno.ENOENT),
    (client_errors.InvalidMetadataError("m"), errno.ENOENT),
    (client_errors.LocalPathError("m"), errno.ENOENT),
    (client_errors.PermissionDeniedError("m"), errno.EACCES),
    (client_errors.AuthenticationError("m"), errno.EACCES),
    (client_errors.StoreUnavailableError("m"), errno.EIO),
    (client_errors.ConflictError("m"), errno.EBUSY),
    (client_errors.LatestMovedError("m"), errno.EBUSY),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "m"), errno.EILSEQ),
    # what the operating system and SQLite raise
    (FileNotFoundError(errno.ENOENT, "m"), errno.ENOENT),
    (OSError(errno.ENOSPC, "m"), errno.ENOSPC),
    (sqlite3.OperationalError("database or disk is full"), errno.ENOSPC),
    # anything else is a bug: EIO (and logged)
    (sqlite3.OperationalError("no such table: nodes"), errno.EIO),
    (OSError("no errno"), errno.EIO),
    (KeyError("x"), errno.EIO),
    (client_errors.ArtifactFSError("m"), errno.EIO),
])
def test_errno_table(exc: BaseException, code: int) -> None:
    assert errno_for(exc) == code


def test_a_mount_error_catches_as_its_stdlib_type() -> None:
    with pytest.raises(FileExistsError):
        raise errors.ExistsError("x")
    with pytest.raises(IsADirectoryError):
        raise errors.IsDirectoryError("x")
    assert errors.ExistsError("x").errno is None  # the errno is the table's, not the instance's
