"""Caption lists for methods that distil through text (ZSCL's reference sentences, PROTOCOLS-2 §3.4).

ZSCL reads every caption of the Conceptual Captions validation split (the CSV its ``gather_cc.py`` writes); any
file works here: plain text with one caption per line, or a CSV / TSV with a ``caption`` or ``title`` column.
``builtin:tiny`` is a short list shipped with cilbench (our own sentences) so tests and ``--quick`` need no file.
The list's sha256 (over the captions as read, in order) goes into the run record and the resume fingerprint.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from cilbench.errors import CilbenchError

BUILTIN = {"builtin:tiny": "resources/tiny_captions.txt"}


def _from_table(path: Path, sep: str) -> list[str]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as err:  # pandas raises many parser errors
        kind = "TSV" if sep == "\t" else "CSV"
        raise CilbenchError(f"captions file {path} is not a readable {kind}: "
                            f"{str(err).splitlines()[0][:120]}") from None
    for column in ("caption", "title", "text"):
        if column in frame.columns:
            return frame[column].tolist()
    raise CilbenchError(f"captions file {path} has no caption, title or text column (it has "
                        f"{', '.join(map(str, frame.columns[:5]))})")


def read_captions(spec: str, what: str = "captions") -> tuple[list[str], str]:
    """(captions, sha256) of ``spec``: ``builtin:tiny`` or a file path. A missing or empty file is one line that
    says ``what`` needed it."""
    if spec in BUILTIN:
        text = resources.files("cilbench.data").joinpath(BUILTIN[spec]).read_text(encoding="utf-8")
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        path = Path(spec).expanduser()
        if spec.startswith("builtin:"):
            raise CilbenchError(f"{what}: unknown built-in caption list {spec!r} (known: {', '.join(BUILTIN)})")
        if not path.is_file():
            raise CilbenchError(f"{what}: no captions file {spec}; give a text file with one caption per line or "
                                f"the Conceptual Captions validation CSV (ZSCL's gather_cc.py)")
        if path.suffix.lower() in (".csv", ".tsv"):
            captions = [c.strip() for c in _from_table(path, "\t" if path.suffix.lower() == ".tsv" else ",")]
            captions = [c for c in captions if c]
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise CilbenchError(f"{what}: cannot read {spec}: {err}") from None
            captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise CilbenchError(f"{what}: {spec} holds no captions")
    digest = hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()
    return captions, digest
