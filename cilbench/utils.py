"""Small shared helpers: atomic writes, seeding, provenance."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results and caches are meant to be shared
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


NAME_MAX = 255  # bytes in one file name on Linux/macOS file systems; longer names fail only at write time
_TEMP_NAME_EXTRA = len("..XXXXXXXX.tmp")  # what atomic_path adds around the name of its temporary file


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Refuse, in one line and before any work, an output path that cannot be written as a regular file.

    Refused: an existing folder, an existing non-regular file (``/dev/null``, a FIFO), a name longer than NAME_MAX
    (less what the atomic write's temporary name adds), a parent that is a file, and a parent folder that neither
    exists writable nor can be created inside a writable folder. Creates nothing; returns the path, ``~`` expanded.
    """
    from cilbench.errors import CilbenchError

    raw = str(path)
    if not raw.strip():
        raise CilbenchError(f"{what} path is empty")
    path = Path(raw).expanduser()
    # Names first: stat() on an over-long name raises instead of answering. The atomic write's temporary file
    # (".NAME.XXXXXXXX.tmp") is what must fit, so the name gets 14 bytes less than NAME_MAX.
    limit = NAME_MAX - _TEMP_NAME_EXTRA
    for i, name in enumerate(path.parts):
        size, most = len(os.fsencode(name)), limit if i == len(path.parts) - 1 else NAME_MAX
        if size > most:
            raise CilbenchError(f"cannot write {what} {raw[:60]}...: the name {name[:30]}... is {size} bytes; at "
                                f"most {most} fit")
    if path.is_dir():
        raise CilbenchError(f"cannot write {what} {path}: it is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise CilbenchError(f"cannot write {what} {path}: it exists and is not a regular file")
    # The nearest existing ancestor decides: it must be a writable folder (missing folders below it get created).
    anchor = path.parent
    while not anchor.exists() and anchor.parent != anchor:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise CilbenchError(f"cannot write {what} {path}: {anchor} is not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise CilbenchError(f"cannot write {what} {path}: no permission to write in {anchor}")
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


def git_hash(path: str | Path | None = None) -> str | None:
    """The commit of the cilbench checkout (with ``-dirty`` when it has uncommitted changes), or None."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names: tuple[str, ...] = ("cilbench", "torch", "torchvision", "timm", "open_clip_torch",
                                               "numpy", "datasets", "huggingface_hub")) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cache_dir(explicit: str | Path | None = None) -> Path:
    """Where prepared datasets live: ``--cache-dir``, else ``$CILBENCH_CACHE``, else ``~/.cache/cilbench``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("CILBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cilbench"
