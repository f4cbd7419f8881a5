"""The one-line error contract, asserted the same way by every test: a failed command prints exactly one line on
stderr and no traceback; a raised ``CilbenchError`` is one non-empty line."""

from __future__ import annotations

import pytest


def cli_error(r, code: int | None = None) -> str:
    """The one stderr line of a failed ``cilbench`` call (the ``cli`` fixture's result), checking the exit code
    when ``code`` is given (any non-zero code otherwise)."""
    assert r.code != 0, (r.code, r.out, r.err)
    if code is not None:
        assert r.code == code, (r.code, r.out, r.err)
    assert "Traceback" not in r.err + r.out
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1, r.err
    return lines[0]


def raised(err: pytest.ExceptionInfo) -> str:
    """The message of a raised error, which must be one non-empty line."""
    text = str(err.value)
    assert text and "\n" not in text
    return text
