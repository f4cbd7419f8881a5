"""A run killed with SIGKILL after a task and resumed ends with the same record numbers as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["run", "finetune", "--dataset", "synthetic", "--quick", "--seed", "7", "--set", "epochs=2"]
# CICAE carries adapters inside the frozen backbone, class Gaussians, extra curves and per-expert views
CICAE = ["run", "cicae", "--dataset", "synthetic", "--quick", "--seed", "7", "--set", "epochs=2",
         "--set", "first_epochs=2"]


def _cli(out: Path, *extra: str, kill_after: int | None = None, args=ARGS) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kill_after is not None:
        env["CILBENCH_TEST_KILL_AFTER_TASK"] = str(kill_after)
    return subprocess.run([sys.executable, "-m", "cilbench", *args, "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [ARGS, CICAE], ids=["finetune", "cicae"])
def test_resume_after_sigkill_gives_identical_numbers(tmp_path, args):
    full = _cli(tmp_path / "full", args=args)
    assert full.returncode == 0, full.stderr
    killed = _cli(tmp_path / "resumed", kill_after=1, args=args)
    assert killed.returncode == -9  # SIGKILL
    assert not list((tmp_path / "resumed").glob("*.json"))  # no record yet
    assert list((tmp_path / "resumed" / ".checkpoints").glob("*.pt"))
    resumed = _cli(tmp_path / "resumed", "--resume", args=args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after task 2" in resumed.stdout
    a = json.loads(next((tmp_path / "full").glob("*.json")).read_text())
    b = json.loads(next((tmp_path / "resumed").glob("*.json")).read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["metrics"] == b["metrics"]
    assert [t["final_loss"] for t in a["timings"]["tasks"]] == [t["final_loss"] for t in b["timings"]["tasks"]]
    assert a["views"] == b["views"]
    drop = [dict(t, phases={k: {**v, "seconds": 0} for k, v in t["phases"].items()}) for t in a["log"]], \
        [dict(t, phases={k: {**v, "seconds": 0} for k, v in t["phases"].items()}) for t in b["log"]]
    assert drop[0] == drop[1]  # logged values and per-epoch terms, all but wall time
    assert not list((tmp_path / "resumed" / ".checkpoints").glob("*.pt"))  # removed once the record is written


def test_a_different_config_is_another_run_with_its_own_checkpoint(tmp_path):
    killed = _cli(tmp_path, kill_after=0)
    assert killed.returncode == -9
    (ckpt,) = (tmp_path / ".checkpoints").glob("*.ckpt.json")
    other = subprocess.run([sys.executable, "-m", "cilbench", *ARGS[:-1], "epochs=3", "--out", str(tmp_path),
                            "--resume"], capture_output=True, text=True, timeout=300)
    # the configuration is part of the run's identity: its own record name, its own (absent) checkpoint
    assert other.returncode == 0, other.stderr
    assert "no checkpoint of this run" in other.stdout
    (record,) = tmp_path.glob("*.json")
    assert "__cfg-" in record.name and json.loads(record.read_text())["overrides"] == {"epochs": 3}
    assert ckpt.exists()  # the killed default run's checkpoint is untouched
    resumed = _cli(tmp_path, "--resume")
    assert resumed.returncode == 0 and "resuming after task 1" in resumed.stdout


def test_resume_refuses_data_prepared_again_from_another_source(tmp_path):
    cache = tmp_path / "cache"
    killed = _cli(tmp_path / "out", "--cache-dir", str(cache), kill_after=0)
    assert killed.returncode == -9
    manifest = cache / "synthetic" / "manifest.json"
    doc = json.loads(manifest.read_text())
    # prepared again from another source: other class names and split recipe over the same files
    doc["class_names"] = [f"other{i}" for i in range(len(doc["class_names"]))]
    doc["split_recipe"] = {"rule": "stratified 80/20", "seed": 42}
    manifest.write_text(json.dumps(doc))
    resumed = _cli(tmp_path / "out", "--cache-dir", str(cache), "--resume")
    assert resumed.returncode != 0
    lines = resumed.stderr.strip().splitlines()
    assert len(lines) == 1 and "prepared data" in lines[0] and "without --resume" in lines[0]
