"""One of each piece of infrastructure: the error registry, the temp-failure classifier, the
atomic writer, the md5 helpers."""

from __future__ import annotations

from client.errors import ArtifactFSError, NotFoundError, error_from_code


def test_an_error_class_defined_after_the_first_lookup_is_found_by_its_code() -> None:
    assert type(error_from_code("NotFoundError", "gone")) is NotFoundError  # the table is in use

    class DefinedLaterError(NotFoundError):
        http_status = 404

    exc = error_from_code("DefinedLaterError", "late")
    assert type(exc) is DefinedLaterError and str(exc) == "late"
    assert type(error_from_code("NoSuchCode", "x")) is ArtifactFSError


def test_fetch_error_comes_back_as_itself() -> None:
    from mountfs.fetch import FetchError

    assert type(error_from_code("FetchError", "retries exhausted")) is FetchError
