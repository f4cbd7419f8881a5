"""Checkpoints that can neither run code nor silently change a number.

A run's checkpoint is two files under ``OUT/.checkpoints/``:

* ``<run>.ckpt.json``: plain JSON, read first: the format, the run's fingerprint, the next task, the record so far
  (accuracy matrix, views, timings, the method's logged values) and the name and sha256 of the tensor file;
* ``<run>.t<k>.pt``: the method's tensors only, loaded with ``torch.load(weights_only=True)`` (no pickled code)
  and only once the fingerprint matched and the file's sha256 equals the one in the JSON, so a planted, truncated
  or bit-flipped file is refused in one line before a tensor is touched.

Both are written atomically, tensors first: a kill between the two writes leaves the previous, consistent pair
(the JSON names its own tensor file). Temporary files of a killed write are removed by the next save or load.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cilbench.data.store import sha256_file
from cilbench.errors import CilbenchError
from cilbench.utils import atomic_path, atomic_write_json

FORMAT = 2  # format 1 was a single pickled .pt file, no longer read


@dataclass
class Loaded:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def next_task(self) -> int:
        return int(self.meta["next_task"])


class Checkpoint:
    """The checkpoint of one run (``stem`` = the record's file stem) in ``folder``."""

    def __init__(self, folder: Path, stem: str, restart_hint: str = "run the same command without --resume"):
        self.folder = Path(folder)
        self.stem = stem
        self.meta_path = self.folder / f"{stem}.ckpt.json"
        self.restart_hint = restart_hint

    def exists(self) -> bool:
        return self.meta_path.exists()

    def legacy_path(self) -> Path:
        """Where cilbench before format 2 kept a run's pickled checkpoint (never loaded now)."""
        return self.folder / f"{self.stem}.pt"

    def _tensor_files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{glob.escape(self.stem)}.t*.pt"))

    def clean_temporary(self) -> None:
        """Remove temporary files left by a killed atomic write of this run's checkpoint."""
        for p in self.folder.glob(f".{glob.escape(self.stem)}.*.tmp"):
            p.unlink(missing_ok=True)

    def save(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
        self.clean_temporary()
        name = f"{self.stem}.t{int(meta['next_task'])}.pt"
        path = self.folder / name
        with atomic_path(path) as tmp:
            torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
        atomic_write_json(self.meta_path, {"format": FORMAT, **meta, "tensors": name,
                                           "tensors_sha256": sha256_file(path)})
        for old in self._tensor_files():
            if old.name != name:
                old.unlink(missing_ok=True)
        return path

    def remove(self) -> None:
        self.meta_path.unlink(missing_ok=True)
        for p in self._tensor_files():
            p.unlink(missing_ok=True)
        self.clean_temporary()

    def _refuse(self, why: str) -> CilbenchError:
        return CilbenchError(f"cannot resume from checkpoint {self.meta_path}: {why}; to start over, "
                             f"{self.restart_hint}")

    def read_meta(self) -> dict[str, Any]:
        """The JSON half, checked for shape (no tensor is read)."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._refuse(f"it is unreadable ({type(err).__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise self._refuse("it is not a checkpoint this cilbench writes")
        shapes = {"fingerprint": str, "next_task": int, "tensors": str, "tensors_sha256": str, "matrix": list,
                  "timings": list, "views": dict, "logged": dict, "started_at": str}
        for key, tp in shapes.items():
            if not isinstance(meta.get(key), tp) or isinstance(meta.get(key), bool):
                raise self._refuse(f"its field {key!r} is missing or malformed")
        if "/" in meta["tensors"] or "\\" in meta["tensors"] or not meta["tensors"].startswith(self.stem + "."):
            raise self._refuse("it names a tensor file outside this run")
        return meta

    def load(self, fingerprint: str, num_tasks: int, device: torch.device) -> Loaded:
        """Verify, then load: shape of the JSON, the run's fingerprint, the tensor file's sha256, then the tensors
        with ``weights_only=True``. Every failure is one line that says how to start over."""
        self.clean_temporary()
        meta = self.read_meta()
        if meta["fingerprint"] != fingerprint:
            raise self._refuse("it was made by a different command, configuration, weights file or prepared data")
        if not 1 <= meta["next_task"] <= num_tasks or len(meta["matrix"]) != meta["next_task"]:
            raise self._refuse("its task count does not fit this run")
        path = self.folder / meta["tensors"]
        if not path.is_file():
            raise self._refuse(f"its tensor file {path.name} is missing")
        if sha256_file(path) != meta["tensors_sha256"]:
            raise self._refuse(f"its tensor file {path.name} does not match its checksum (damaged or replaced)")
        try:
            tensors = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a damaged file here
            raise self._refuse(f"its tensor file cannot be read ({type(err).__name__})") from None
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise self._refuse("its tensor file does not hold named tensors")
        return Loaded(meta, tensors)
