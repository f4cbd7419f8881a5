"""Reaching the Hugging Face hub without hanging, and telling network failures from real errors.

Hub timeouts default to 10 s (a user's own setting wins). Before a model download, ``ensure_hub_or_offline`` probes
the endpoint with one name lookup and one TCP connect, each bounded by a short timeout; when it cannot be reached the process switches the hub libraries to offline
mode (``HF_HUB_OFFLINE=1``), so what is already in the local cache still loads and anything else fails at once
instead of retrying for a minute.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

HUB_TIMEOUT_S = 10
PROBE_TIMEOUT_S = 3.0
for _var in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):  # read by huggingface_hub at import time
    os.environ.setdefault(_var, str(HUB_TIMEOUT_S))

_TRUE = {"1", "ON", "YES", "TRUE"}
# exception class names that mean "the network or the hub is unreachable" (httpx / httpx2 / requests / huggingface_hub)
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
                   "NetworkError", "TransportError", "ProxyError", "RemoteProtocolError", "OfflineModeIsEnabled",
                   "LocalEntryNotFoundError", "ConnectionError", "Timeout", "MaxRetryError", "NameResolutionError",
                   "URLError"}


def offline_reason() -> str | None:
    """Why the hub must not be contacted (offline mode set in the environment), or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"offline mode: {var}={os.environ[var]}"
    return None


def network_reason(err: BaseException) -> str | None:
    """A short reason when ``err`` (or what caused it) is a network failure, else None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        names = {c.__name__ for c in type(e).__mro__}
        if names & _NETWORK_ERRORS or isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            inner = e
            while inner.__cause__ is not None or inner.__context__ is not None:  # the innermost says it best
                inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
            text = str(inner) or type(inner).__name__
            return (text[:117] + "...") if len(text) > 120 else text
        todo += [e.__cause__, e.__context__]
    return None


@lru_cache(maxsize=None)
def hub_reachable(endpoint: str | None = None) -> bool:
    endpoint = endpoint or os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    address = _resolve(host, port, PROBE_TIMEOUT_S)
    if address is None:
        return False
    try:
        with socket.create_connection(address, timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _resolve(host: str, port: int, timeout: float) -> tuple[str, int] | None:
    """The first address of ``host``, or None when the name does not resolve within ``timeout`` seconds: the
    connect timeout does not bound the name lookup, which can hang on a machine whose resolver is unreachable. The
    lookup runs on a daemon thread, so a hung lookup never delays the exit either."""
    import threading

    found: list = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][:2])
        except OSError:
            pass

    thread = threading.Thread(target=lookup, daemon=True, name="cilbench-hub-dns")
    thread.start()
    thread.join(timeout)
    return found[0] if found else None


def ensure_hub_or_offline() -> bool:
    """True when the hub can be used; otherwise set offline mode for this process and return False."""
    for name in ("huggingface_hub", "huggingface_hub.utils._http", "datasets", "timm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if offline_reason():  # set in the environment, maybe after huggingface_hub read it at import: tell it again
        _library_offline()
        return False
    if hub_reachable():
        return True
    os.environ["HF_HUB_OFFLINE"] = "1"
    _library_offline()
    return False


def _library_offline() -> None:
    """Offline mode for a huggingface_hub imported already: it reads ``HF_HUB_OFFLINE`` once, at import time, so a
    process that set the variable later (a notebook; a test fixture after timm was imported) would still try the
    network and wait for its timeouts."""
    try:
        import huggingface_hub.constants as c

        c.HF_HUB_OFFLINE = True
    except Exception:
        pass
