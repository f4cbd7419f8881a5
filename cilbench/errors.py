"""User-facing errors: one clear line, a non-zero exit, never a traceback."""

from __future__ import annotations


class CilbenchError(Exception):
    """An error the user can cause and fix. The CLI prints ``str(err)`` as one line and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(message.split()))  # always one line
        if exit_code is not None:
            self.exit_code = exit_code


class HubUnreachable(CilbenchError):
    """The model or dataset hub cannot be reached (no network, or offline mode)."""

    exit_code = 3
