"""Bounded time: with the registry server stopped (SIGSTOP: connections are accepted by the
kernel, nothing answers), an SDK call and a mount read fail within ARTIFACTFS_REQUEST_TIMEOUT,
other files keep being served, and everything works again after SIGCONT.

Each check waits for the operation in a thread with a generous limit (bound + 10 s): the
assertion is "it returned an error, and within the bound", not a timing benchmark."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from client.errors import StoreUnavailableError
from client.retry import RESUME_MIN_PROGRESS, THIN_ROUNDS, RetryPolicy, resume_while_progressing
from tests.server_fixtures import MotoS3, RegistryServer, ServerFactory, make_store, moto_s3  # noqa: F401
from tests.util import commit_files

pytestmark = pytest.mark.timeout(180)
BOUND = 3.0  #: ARTIFACTFS_REQUEST_TIMEOUT in these tests, seconds
SLACK = 10.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerFactory, RegistryServer]]:
    factory = ServerFactory(f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "blobs"), tmp_path)
    srv = factory.start()
    try:
        yield factory, srv
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
        factory.stop_all()


def outcome_within(fn: Callable[[], Any], limit: float) -> tuple[BaseException | None, float]:
    """Run ``fn`` in a thread; (its exception or None, seconds taken).  Fails if it took longer."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["error"] = exc

    started = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    took = time.monotonic() - started
    assert not t.is_alive(), f"still waiting after {took:.1f}s (bound {BOUND}s)"
    return box.get("error"), took


def test_retry_policy_gives_up_at_its_deadline_and_nested_calls_do_not_multiply() -> None:
    calls: list[str] = []

    def flaky_inner() -> None:
        calls.append("inner")
        raise ConnectionError("down")

    inner = RetryPolicy(tries=5, backoff=0.05, deadline=10.0)
    outer = RetryPolicy(tries=3, backoff=0.05, deadline=10.0)

    def give_up(exc: BaseException, n: int) -> BaseException:
        return StoreUnavailableError(f"gave up after {n}")

    def outer_call() -> None:
        calls.append("outer")
        inner.call(flaky_inner, is_temp=lambda e: isinstance(e, (ConnectionError, StoreUnavailableError)),
                   give_up=give_up)

    with pytest.raises(StoreUnavailableError, match="gave up after 3"):
        outer.call(outer_call, is_temp=lambda e: isinstance(e, StoreUnavailableError), give_up=give_up)
    assert calls == ["outer", "inner"] * 3  # 3 tries, not 3 x 5

    slow = RetryPolicy(tries=1000, backoff=0.2, max_backoff=0.2, deadline=1.0)
    n = [0]

    def fail() -> None:
        n[0] += 1
        raise ConnectionError("down")

    with pytest.raises(StoreUnavailableError):
        slow.call(fail, is_temp=lambda e: True, give_up=give_up)
    assert 2 <= n[0] <= 10  # the deadline, not the 1000 tries, ended it


def _breaking_stream(length: int, per_round: int) -> tuple[Callable[[], None], Callable[[], int], list[int]]:
    """A stream of ``length`` bytes whose every round moves ``per_round`` bytes, then gives up."""
    pos, rounds = [0], [0]

    def call() -> None:
        rounds[0] += 1
        pos[0] = min(length, pos[0] + per_round)
        if pos[0] < length:
            raise StoreUnavailableError(f"broke at {pos[0]}")

    return call, lambda: pos[0], rounds


def test_a_stream_that_breaks_after_a_little_progress_is_given_up_in_a_few_rounds() -> None:
    """Progress earns a fresh retry budget only when a round moved RESUME_MIN_PROGRESS: a link
    that breaks every 64 KiB used to be resumed all the way through the stream (16,384 rounds of
    a 1 GiB file, each a whole retry policy: hours); it now fails after THIN_ROUNDS rounds."""
    call, position, rounds = _breaking_stream(1 << 30, 64 << 10)
    with pytest.raises(StoreUnavailableError):
        resume_while_progressing(call, position, StoreUnavailableError)
    assert rounds[0] == THIN_ROUNDS
    # a link that moves a few MiB per round does get through, however long the stream
    call, position, rounds = _breaking_stream(1 << 30, RESUME_MIN_PROGRESS)
    resume_while_progressing(call, position, StoreUnavailableError)
    assert position() == 1 << 30 and rounds[0] == 256
    # a round that moved nothing is not resumed at all
    call, position, rounds = _breaking_stream(1 << 30, 0)
    with pytest.raises(StoreUnavailableError):
        resume_while_progressing(call, position, StoreUnavailableError)
    assert rounds[0] == 1


def test_sdk_call_to_a_stopped_server_fails_within_the_bound(server, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    factory, srv = server
    monkeypatch.setenv("ARTIFACTFS_REQUEST_TIMEOUT", str(BOUND))
    key = factory.user("alice")
    store = make_store(srv.url, key)
    v0, _ = commit_files(store, tmp_path, {"x.bin": b"x" * 5000}, entity="alice")
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        for call in (lambda: store.list_projects("alice"),
                     lambda: store.read_blob("alice", v0.manifest_md5),
                     lambda: store.resolve("alice", "proj", "ds", "latest")):
            error, took = outcome_within(call, BOUND + SLACK)
            assert isinstance(error, StoreUnavailableError), error
            assert took < BOUND + 2.0
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    assert store.resolve("alice", "proj", "ds", "latest").id == v0.id  # recovered by itself


def test_mount_read_from_a_stopped_server_is_eio_within_the_bound_then_recovers(
        server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.mount_helpers import mounted, requires_fuse

    if requires_fuse.args and requires_fuse.args[0]:
        pytest.skip(requires_fuse.kwargs.get("reason", "needs FUSE"))
    factory, srv = server
    key = factory.user("alice")
    big, small = os.urandom(3 << 20), os.urandom(10_000)
    commit_files(make_store(srv.url, key), tmp_path, {"big.bin": big, "small.bin": small}, entity="alice")
    monkeypatch.setenv("ARTIFACTFS_API_KEY", key)
    monkeypatch.setenv("ARTIFACTFS_REQUEST_TIMEOUT", str(BOUND))
    (tmp_path / "m").mkdir()
    with mounted(srv.url, tmp_path / "m") as m:  # type: ignore[arg-type]
        version = m.path / "alice" / "proj" / "ds:v0"
        assert (version / "small.bin").read_bytes() == small  # now in the cache
        fd_big = os.open(version / "big.bin", os.O_RDONLY)  # open costs no request
        fd_small = os.open(version / "small.bin", os.O_RDONLY)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            error, took = outcome_within(lambda: os.pread(fd_big, 4096, 2 << 20), BOUND + SLACK)
            assert isinstance(error, OSError) and error.errno == errno.EIO, error
            # the bound holds per FUSE request; one read(2) may cost the kernel two of them
            # (its readahead, then the page itself), each answered EIO within the bound
            failed = m.log_text().count("read -> EIO")
            assert 1 <= failed <= 2 and took < failed * BOUND + 2.0, (failed, took)
            # other (cached) files keep being served while the server is stopped
            os.posix_fadvise(fd_small, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd_small, 20_000, 0) == small
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert os.pread(fd_big, 4096, 2 << 20) == big[2 << 20:(2 << 20) + 4096]  # recovered by itself
        os.close(fd_big)
        os.close(fd_small)


def test_sdk_read_from_a_stopped_s3_endpoint_fails_within_the_bound(moto_s3: MotoS3, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Blob bytes go straight to S3 (presigned URLs): a stopped S3 is bounded the same way."""
    factory = ServerFactory(f"sqlite:///{tmp_path / 'registry.db'}", f"s3://{moto_s3.new_bucket()}/blobs", tmp_path,
                            s3_endpoint=moto_s3.url)
    try:
        srv = factory.start()
        monkeypatch.setenv("ARTIFACTFS_REQUEST_TIMEOUT", str(BOUND))
        store = make_store(srv.url, factory.user("alice"))
        data = os.urandom(100_000)
        commit_files(store, tmp_path, {"x.bin": data}, entity="alice")
        from client.hashing import md5_bytes

        os.kill(moto_s3.proc.pid, signal.SIGSTOP)
        try:
            error, took = outcome_within(lambda: store.read_blob("alice", md5_bytes(data), 0, 1000), BOUND + SLACK)
            assert isinstance(error, StoreUnavailableError), error
            assert took < BOUND + 2.0
        finally:
            os.kill(moto_s3.proc.pid, signal.SIGCONT)
        assert store.read_blob("alice", md5_bytes(data), 0, 1000) == data[:1000]  # recovered by itself
    finally:
        factory.stop_all()
