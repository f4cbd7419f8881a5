"""Reaching the Hugging Face hub without hanging.

Before any download, ``ensure_hub_or_offline`` probes the hub endpoint with one short TCP connect. When it cannot be
reached the process switches the hub libraries to offline mode (``HF_HUB_OFFLINE=1``), so what is already in the
local cache still loads and anything else fails at once instead of retrying for a minute.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


@lru_cache(maxsize=None)
def hub_reachable(endpoint: str | None = None) -> bool:
    endpoint = endpoint or os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def ensure_hub_or_offline() -> bool:
    """True when the hub can be used; otherwise set offline mode for this process and return False."""
    for name in ("huggingface_hub", "huggingface_hub.utils._http", "datasets", "timm", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    if offline_requested():
        return False
    if hub_reachable():
        return True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:  # libraries that read the flag at import time
        import huggingface_hub.constants as c

        c.HF_HUB_OFFLINE = True
    except Exception:
        pass
    try:
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = True
    except Exception:
        pass
    return False
