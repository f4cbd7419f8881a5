"""Shared fixtures: an isolated cache and results folder, and an in-process CLI runner."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the session: offline datasets are prepared once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, shared_cache):
    monkeypatch.setenv("CILBENCH_CACHE", str(shared_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never touch the network
    monkeypatch.delenv("CILBENCH_TEST_KILL_AFTER_TASK", raising=False)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``cilbench ARGS`` in-process through ``cilbench.cli.main`` (the console entry point)."""
    from cilbench import cli as cli_module

    def invoke(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["cilbench", *map(str, args)])
        code = 0
        try:
            cli_module.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke
