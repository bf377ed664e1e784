"""The HTTP store's requests (blob GETs, JSON calls, uploads), straight over urllib3 (issue 17).

A cold small file read through the mount is one ranged GET to a presigned URL.  Through a
``requests.Session`` that GET cost about as much CPU as everything else of the read together
(merging the session's settings, the environment and the cookies, building a PreparedRequest,
hooks, a Response wrapping urllib3's); urllib3's own pools do the same request for a fraction.
The store's JSON calls (resolve, listings, signing: issue 13) and its uploads go through the
same pools (:meth:`BlobHTTP.request`), so the HTTP store imports no ``requests`` at all: that
package cost a CLI process about 16 ms of start-up with compiled modules, 24 ms without (issue 17).

What a request keeps from the ``requests.Session`` it replaced, so callers see no difference:

* certificates: verified against the same CA file as the session (ARTIFACTFS_CA_BUNDLE, else
  REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE as requests reads them, else the OS store, else
  certifi); never unverified;
* the environment's proxies (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY: :func:`environment_proxy`),
  looked up once per host;
* redirects followed (at most :data:`MAX_REDIRECTS`), no retry of its own: the store's one
  retry policy (:mod:`client.retry`) owns the attempts, and urllib3's failures are classified
  there like requests' (:func:`client.retry.is_transport_failure`);
* connect and read timeouts per attempt, given by the caller.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import urllib3
import urllib3.exceptions

from .fast_get import FastGet, NotFast

#: what requests follows for a GET is 30; a presigned URL needs none, a proxy in front one or two
MAX_REDIRECTS = 5
#: no attempt is repeated here (connect/read/status 0); redirects are followed
_RETRIES = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=MAX_REDIRECTS,
                         raise_on_redirect=True, raise_on_status=False, respect_retry_after_header=False)

#: told of every exchange: (method, url, request headers); tests count requests with it
Observer = Callable[[str, str, Mapping[str, str]], None]


def tls_arguments(verify: str | bool, explicit: bool) -> dict[str, Any]:
    """urllib3's certificate arguments for what a requests session with ``verify`` checks
    against.  ``explicit``: ``verify`` was chosen (ARTIFACTFS_CA_BUNDLE) and wins over the
    environment's REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, which otherwise win over it."""
    chosen: str | bool = verify
    if not explicit:
        chosen = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or verify
    if chosen is True:
        import certifi  # requests' own fallback

        chosen = certifi.where()
    if not isinstance(chosen, str):
        raise ValueError("blob downloads always verify certificates")
    return {"cert_reqs": "CERT_REQUIRED", ("ca_cert_dir" if os.path.isdir(chosen) else "ca_certs"): chosen}


def _env(name: str) -> str:
    """An environment variable as curl and requests read proxy settings: lower case first."""
    return os.environ.get(name) or os.environ.get(name.upper()) or ""


def _bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether NO_PROXY (comma-separated) lists ``host`` as requests reads it: ``*``, a CIDR
    network holding the address, or a suffix of the name (``example.com``, ``.example.com``),
    alone or with the port (``example.com:8080``)."""
    with_port = f"{host}:{port}" if port else host
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.lower() for e in no_proxy.replace(" ", "").split(",") if e):
        if entry == "*":
            return True
        if "/" in entry:
            try:
                if address is not None and address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
        elif host.endswith(entry) or with_port.endswith(entry):
            return True
    return False


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` as requests chooses it (``<scheme>_proxy``,
    else ``all_proxy``; none when NO_PROXY lists the host), or None: go direct."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host or _bypassed(host, parts.port, _env("no_proxy")):
        return None
    return _env(f"{parts.scheme}_proxy") or _env("all_proxy") or None


class BlobHTTP:
    """Pooled requests to any host (the registry server, the object store's presigned URLs).

    Thread-safe: urllib3's pools are; the per-host choice of direct or proxied is made once."""

    def __init__(self, verify: str | bool, *, explicit: bool, pool_size: int) -> None:
        tls = tls_arguments(verify, explicit)
        self._pool_args: dict[str, Any] = {"num_pools": 16, "maxsize": pool_size, "retries": _RETRIES, **tls}
        self._direct = urllib3.PoolManager(**self._pool_args)
        #: direct GETs (every blob read) go through this keep-alive path first
        self.fast = FastGet(tls, pool_size)
        self._managers: dict[tuple[str, str], urllib3.PoolManager] = {}
        self._lock = threading.Lock()
        self.observers: list[Observer] = []

    def _manager(self, url: str) -> urllib3.PoolManager:
        """The pool manager for ``url``'s host: direct, or through the environment's proxy."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        manager = self._managers.get(key)
        if manager is None:
            proxy = environment_proxy(url)
            manager = self._direct if not proxy else urllib3.ProxyManager(proxy, **self._pool_args)
            with self._lock:
                manager = self._managers.setdefault(key, manager)
        return manager

    def get(self, url: str, headers: Mapping[str, str], timeout: tuple[float, float], *,
            stream: bool) -> urllib3.BaseHTTPResponse:
        """One GET; ``stream``: the body is left on the socket for the caller to read (and
        close), else it is read whole and the connection back in its pool.  A transport
        failure raises urllib3's own exception (unwrapped from MaxRetryError).

        A GET that goes direct (no proxy) is sent on :class:`~client.store.fast_get.FastGet`'s
        kept-alive sockets; an answer that path does not read is asked again through urllib3."""
        if self._manager(url) is self._direct:
            for observe in self.observers:
                observe("GET", url, headers)
            try:
                resp = self.fast.get(url, headers, timeout)
            except NotFast:
                pass
            else:
                if not stream:
                    resp.data  # noqa: B018 - read whole now, the socket back in its pool
                return resp  # type: ignore[return-value]  # the names the store reads
        return self.request("GET", url, headers, timeout, stream=stream)

    def request(self, method: str, url: str, headers: Mapping[str, str], timeout: tuple[float, float], *,
                body: Any = None, stream: bool = False) -> urllib3.BaseHTTPResponse:
        """One request of any method; ``body``: None, bytes, or a file read in blocks as it is sent."""
        for observe in self.observers:
            observe(method, url, headers)
        try:
            return self._manager(url).urlopen(method, url, body=body, headers=dict(headers), redirect=True,
                                              timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
                                              preload_content=not stream)
        except urllib3.exceptions.MaxRetryError as exc:
            if isinstance(exc.reason, Exception):
                raise exc.reason from exc  # the failure itself, as without retries
            raise

    def close(self) -> None:
        with self._lock:
            managers = {id(m): m for m in [self._direct, *self._managers.values()]}
            self._managers.clear()
        for manager in managers.values():
            manager.clear()
        self.fast.close()
