"""Results a user can trust: a run's identity includes its configuration and weights, checkpoints cannot run code
or silently change numbers, and every user error is one line before any work."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _one_line import cli_error as _one_line

from cilbench.engine.checkpoint import Checkpoint
from cilbench.errors import CilbenchError
from cilbench.identity import config_key, describe, expected_config_key

RUN = ["run", "finetune", "--dataset", "synthetic", "--quick", "--set", "epochs=1", "--set", "first_epochs=1"]


# ------------------------------------------------------------------------------------------------ identity


def test_config_key_is_empty_for_defaults_and_names_overrides():
    assert config_key({}) == ""
    a, b = config_key({"lambda1": 0.0, "lambda2": 0.0}), config_key({"lambda1": 25.0})
    assert len(a) == 8 and a != b
    assert config_key({"x": (1, 2)}) == config_key({"x": [1, 2]})  # a config's tuple and a record's list
    assert config_key({}, "ab" * 32) not in ("", a)  # a weights file alone is another configuration
    assert describe({"lambda2": 0.0, "lambda1": 0.0}) == "lambda1=0, lambda2=0"
    # a --set equal to the method's own value (after the dataset preset) is the default run
    assert expected_config_key("cicae", "imagenet-a", False, {"lambda1": "25"}) == ""
    assert expected_config_key("cicae", "imagenet-a", False, {"lambda1": "0", "lambda2": "0"}) != ""


def test_two_configurations_write_two_records(cli, tmp_path):
    out = tmp_path / "res"
    assert cli(*RUN, "--out", out).code == 0
    assert cli(*RUN, "--set", "lr=0.05", "--out", out).code == 0
    assert len(list(out.glob("*.json"))) == 2
    recs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    keyed = next(r for r in recs if "lr" in r["overrides"])
    other = next(r for r in recs if "lr" not in r["overrides"])
    assert keyed["overrides"] == {**other["overrides"], "lr": 0.05} and "lr=0.05" in keyed["config_label"]
    assert keyed["config_key"] != other["config_key"]
    assert keyed["run_id"].endswith(f"cfg-{keyed['config_key']}__quick")
    # the data the run was made on
    data = keyed["data"]["synthetic"]
    assert data["source"] == "offline" and len(data["content_sha256"]) == 64 and data["counts"]["test"] > 0


def test_a_record_of_another_configuration_is_never_overwritten(cli, tmp_path):
    out = tmp_path / "res"
    assert cli(*RUN, "--out", out).code == 0
    (path,) = out.glob("*.json")
    rec = json.loads(path.read_text())
    rec["config"]["lr"] = 0.5  # made by another configuration under the same name (e.g. other defaults)
    path.write_text(json.dumps(rec))
    r = cli(*RUN, "--out", out)
    assert "made with another configuration" in _one_line(r)
    assert json.loads(path.read_text())["config"]["lr"] == 0.5


def test_sweep_dry_run_maps_the_ablation_and_the_full_model_to_two_records(cli, tmp_path):
    r = cli("sweep", "cicae-table4", "--dry-run", "--results", tmp_path)
    assert r.code == 0, r.err
    targets = [line.split("-> ")[-1].strip() for line in r.out.splitlines() if "-> " in line]
    assert len(targets) == len(set(targets)) >= 2
    assert any("__cfg-" in t for t in targets) and any("__cfg-" not in t for t in targets)


def test_sweep_reruns_a_record_made_with_another_configuration(tmp_path):
    from cilbench.suites import parse_suite, sweep

    suite = parse_suite({"title": "t", "paper": "p", "table": "1", "seeds": [3],
                         "columns": [{"dataset": "synthetic", "scenario": "B0Inc10"}],
                         "rows": [{"label": "FT", "method": "finetune", "sets": {"epochs": 1, "first_epochs": 1}}]},
                        tmp_path / "s.yaml")
    (first,) = sweep(suite, tmp_path, quick=True)
    assert first.status == "ran"
    assert [i.status for i in sweep(suite, tmp_path, quick=True)] == ["done"]
    rec = json.loads(first.record.read_text())
    rec["config"]["lr"] = 0.5
    first.record.write_text(json.dumps(rec))
    (again,) = sweep(suite, tmp_path, quick=True)
    assert again.status == "failed" and "another configuration" in again.message


def test_weights_with_a_random_backbone_are_refused(cli, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, weights)
    r = cli("run", "simplecil", "--dataset", "synthetic", "--quick", "--weights", weights, "--out", tmp_path / "o")
    assert "--weights" in _one_line(r) and "--quick" in _one_line(r)
    assert not (tmp_path / "o").exists()


def test_a_weights_file_the_backbone_cannot_take_is_one_line(tmp_path):
    from cilbench.models.backbones import build_backbone

    wrong = tmp_path / "wrong.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(CilbenchError, match="does not fit backbone vit-b16-in21k.*another shape"):
        build_backbone("vit-b16-in21k", weights=wrong)
    code = tmp_path / "code.pth"
    code.write_bytes(pickle.dumps(_Marker(tmp_path / "ran")))
    with pytest.raises(CilbenchError, match="pickled code is never run"):
        build_backbone("vit-b16-in21k", weights=code)
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------------------------------------ checkpoints


class _Marker:
    """A pickle that creates a file when unpickled: what a planted checkpoint could do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _killed_run(tmp_path: Path, after: int = 0) -> Path:
    out = tmp_path / "res"
    env = dict(os.environ, OMP_NUM_THREADS="1", CILBENCH_TEST_KILL_AFTER_TASK=str(after))
    p = subprocess.run([sys.executable, "-m", "cilbench", *RUN, "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -9, p.stderr
    return out


def test_checkpoint_tensors_are_verified_before_loading(tmp_path):
    ck = Checkpoint(tmp_path, "run")
    meta = dict(fingerprint="f" * 16, next_task=1, matrix=[[50.0]], timings=[{}], views={}, logged={},
                started_at="now")
    ck.save(meta, {"w": torch.arange(4.0)})
    loaded = ck.load("f" * 16, 2, torch.device("cpu"))
    assert torch.equal(loaded.tensors["w"], torch.arange(4.0)) and loaded.next_task == 1
    with pytest.raises(CilbenchError, match="different command"):
        ck.load("0" * 16, 2, torch.device("cpu"))
    (pt,) = tmp_path.glob("run.t1.pt")
    blob = bytearray(pt.read_bytes())
    blob[-40] ^= 0xFF  # one flipped byte in the tensor data loads silently without a checksum
    pt.write_bytes(bytes(blob))
    with pytest.raises(CilbenchError, match="does not match its checksum.*without --resume"):
        ck.load("f" * 16, 2, torch.device("cpu"))
    pt.write_bytes(bytes(blob[:100]))  # truncated
    with pytest.raises(CilbenchError, match="checksum"):
        ck.load("f" * 16, 2, torch.device("cpu"))
    ck.meta_path.write_text("{not json")
    with pytest.raises(CilbenchError, match="unreadable"):
        ck.load("f" * 16, 2, torch.device("cpu"))


def test_a_forged_checkpoint_cannot_run_code(tmp_path):
    ck = Checkpoint(tmp_path, "run")
    ck.save(dict(fingerprint="f" * 16, next_task=1, matrix=[[1.0]], timings=[{}], views={}, logged={},
                 started_at="now"), {"w": torch.zeros(1)})
    pt = tmp_path / "run.t1.pt"
    torch.save({"w": _Marker(tmp_path / "ran")}, pt)  # a pickle with code, its checksum forged to match
    meta = json.loads(ck.meta_path.read_text())
    from cilbench.data.store import sha256_file

    meta["tensors_sha256"] = sha256_file(pt)
    ck.meta_path.write_text(json.dumps(meta))
    with pytest.raises(CilbenchError, match="cannot be read"):
        ck.load("f" * 16, 2, torch.device("cpu"))
    assert not (tmp_path / "ran").exists()


def test_a_planted_checkpoint_does_not_run_during_a_sweep(cli, tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text("title: t\npaper: p\ntable: '1'\nseeds: [1993]\ncolumns: [{dataset: synthetic, scenario: "
                     "B0Inc10}]\nrows: [{label: FT, method: finetune, sets: {epochs: 1, first_epochs: 1}}]\n")
    dry = cli("sweep", suite, "--dry-run", "--results", tmp_path / "res", "--quick")
    stem = dry.out.split("-> ")[-1].split(".json")[0].strip()
    folder = tmp_path / "res" / ".checkpoints"
    folder.mkdir(parents=True)
    (folder / f"{stem}.pt").write_bytes(pickle.dumps(_Marker(tmp_path / "ran")))  # the format-1 name
    r = cli("sweep", suite, "--results", tmp_path / "res", "--quick")
    assert r.code == 0, r.err + r.out
    assert not (tmp_path / "ran").exists()
    assert not (folder / f"{stem}.pt").exists()


def test_a_damaged_checkpoint_is_one_line_and_sweep_restart_gets_past_it(cli, tmp_path):
    out = _killed_run(tmp_path)
    (meta,) = (out / ".checkpoints").glob("*.ckpt.json")
    (pt,) = (out / ".checkpoints").glob("*.pt")
    pt.write_bytes(pt.read_bytes()[:-10])
    r = cli(*RUN, "--out", out, "--resume")
    line = _one_line(r)
    assert "checksum" in line and "without --resume" in line
    # without --resume: says so in one line and starts over
    (out / ".checkpoints" / f".{meta.stem}.json.abc123.tmp").write_text("half")  # a killed write's leftover
    stem = meta.name.removesuffix(".ckpt.json")
    (out / f".{stem}.json.abc123.tmp").write_text("half")  # a killed record write's leftover
    r = cli(*RUN, "--out", out)
    assert r.code == 0 and "starting over" in r.out
    assert not list((out / ".checkpoints").iterdir())
    assert not list(out.glob(".*.tmp"))
    # a sweep over a damaged checkpoint fails with --restart in its hint, and --restart runs it
    suite = tmp_path / "s.yaml"
    suite.write_text("title: t\npaper: p\ntable: '1'\nseeds: [1993]\ncolumns: [{dataset: synthetic, scenario: "
                     "B0Inc5}]\nrows: [{label: FT, method: finetune, sets: {epochs: 1, first_epochs: 1}}]\n")
    for p in out.glob("*.json"):
        p.unlink()
    out2 = _killed_run(tmp_path)
    assert out2 == out
    (meta,) = (out / ".checkpoints").glob("*.ckpt.json")
    meta.write_text("[]")
    r = cli("sweep", suite, "--results", out, "--quick")
    assert r.code == 1 and "--restart" in r.out
    r = cli("sweep", suite, "--results", out, "--quick", "--restart")
    assert r.code == 0 and "1 ran" in r.out


# ------------------------------------------------------------------------------------------------ one-line errors


@pytest.mark.parametrize("args,message", [
    (["run", "finetune", "--dataset", "synthetic", "--seed", "-1"], "--seed must be an integer from 0"),
    (["datasets", "split", "cifar100", "--seed", "-1"], "--seed must be an integer from 0"),
    (["run", "finetune", "--dataset", "synthetic", "--set", "batch_size=0"], "--set batch_size=0: must be at least 1"),
    (["run", "finetune", "--dataset", "synthetic", "--set", "lr=-5"], "--set lr=-5.0: must be at least 0"),
    (["run", "finetune", "--dataset", "synthetic", "--set", "epochs=-1"], "--set epochs=-1: must be at least 0"),
    (["run", "finetune", "--dataset", "synthetic", "--set", "optimizer=lion"], "must be one of sgd, adamw, adam"),
    (["run", "finetune", "--dataset", "synthetic", "--device", "cuda:abc"], "unknown device 'cuda:abc'"),
    (["run", "finetune", "--dataset", "synthetic", "--tag", "x" * 300], "--tag"),
    (["run", "finetune", "--dataset", "synthetic", "--tag", "a/b"], "--tag"),
    (["run", "finetune", "--dataset", "cifar100", "--order", "II"], "--order II is for dataset sequences"),
    (["datasets", "split", "cifar100", "--scenario", "B0Inc10\n"], "malformed scenario"),
    (["datasets", "split", "cifar100", "--scenario", "B0Inc\u0661\u0660"], "malformed scenario"),
    (["bench", "finetune", "--batch-size", "-4"], "--batch-size must be at least 1"),
    (["bench", "finetune", "--steps", "-3"], "--steps must be at least 1"),
])
def test_bad_values_are_one_line(cli, tmp_path, args, message):
    r = cli(*args, "--out", tmp_path / "o") if args[0] == "run" else cli(*args)
    assert message in _one_line(r)


@pytest.mark.parametrize("out", ["/dev/null", "FILE", "DIR_IN_FILE"])
def test_an_unwritable_out_fails_before_any_work(cli, tmp_path, out):
    (tmp_path / "file").write_text("x")
    target = {"FILE": tmp_path / "file", "DIR_IN_FILE": tmp_path / "file" / "sub"}.get(out, out)
    r = cli("run", "finetune", "--dataset", "synthetic", "--quick", "--out", target)
    assert "cannot write run record" in _one_line(r)
    assert "A_t" not in r.out  # nothing trained


@pytest.mark.parametrize("row,message", [
    ("{label: X, method: 123}", "method must be a method name"),
    ("{label: X, method: finetune, datasets: synthetic}", "datasets must be a list"),
    ("{label: X, method: finetune, sets: {lr: {a: 1}}}", "sets.lr must be"),
])
def test_suite_rows_of_the_wrong_type_are_one_line(cli, tmp_path, row, message):
    suite = tmp_path / "s.yaml"
    suite.write_text(f"title: t\npaper: p\ntable: '1'\ncolumns: [{{dataset: synthetic, scenario: B0Inc5}}]\n"
                     f"rows: [{row}]\n")
    assert message in _one_line(cli("sweep", suite, "--dry-run", "--results", tmp_path))
    suite.write_text("title: t\npaper: p\ntable: '1'\ncolumns: [{dataset: synthetic, scenario: B0Inc5}]\n"
                     "rows: [{label: X, method: finetune}]\nseeds: [-1]\n")
    assert "seeds must be" in _one_line(cli("sweep", suite, "--dry-run", "--results", tmp_path))


def test_sweep_goes_on_after_an_unexpected_error(tmp_path, monkeypatch):
    from cilbench.engine.runner import Runner
    from cilbench.suites import parse_suite, sweep

    suite = parse_suite({"title": "t", "paper": "p", "table": "1", "seeds": [1, 2],
                         "columns": [{"dataset": "synthetic", "scenario": "B0Inc10"}],
                         "rows": [{"label": "FT", "method": "finetune", "sets": {"epochs": 1, "first_epochs": 1}}]},
                        tmp_path / "s.yaml")
    real = Runner.run

    def flaky(self, *a, **k):
        if self.opts.seed == 1:
            raise RuntimeError("boom")
        return real(self, *a, **k)

    monkeypatch.setattr(Runner, "run", flaky)
    items = sweep(suite, tmp_path, quick=True)
    assert [i.status for i in items] == ["failed", "ran"]
    assert items[0].message == "RuntimeError: boom"


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ, OMP_NUM_THREADS="1", CILBENCH_TEST_INTERRUPT_AFTER_TASK="1")
    p = subprocess.run([sys.executable, "-m", "cilbench", *RUN, "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 130 and "Traceback" not in p.stderr
    line = " ".join(p.stderr.split())
    assert "interrupted; tasks 1-2 of 2 are saved" in line or "interrupted; tasks 1-2 of 4 are saved" in line
    assert ".ckpt.json" in line and "--resume" in line
    resume = line.split("continue with: ")[1].split()
    env.pop("CILBENCH_TEST_INTERRUPT_AFTER_TASK")
    r = subprocess.run([sys.executable, "-m", *resume[0:0], "cilbench", *resume[1:]], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "resuming after task 2" in r.stdout


def test_a_closed_pipe_does_not_kill_the_run(tmp_path):
    out = tmp_path / "res"
    cmd = f"{sys.executable} -m cilbench {' '.join(RUN)} --out {out} | head -c 1"
    p = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and len(list(out.glob("*.json"))) == 1


def test_a_store_copied_into_another_datasets_folder_is_refused(tmp_path):
    import shutil

    from cilbench.data.prepare import open_store

    open_store("digits", tmp_path)
    shutil.copytree(tmp_path / "digits", tmp_path / "synthetic")
    with pytest.raises(CilbenchError, match="holds digits with 10 classes.*synthetic has 20"):
        open_store("synthetic", tmp_path)


def test_a_setting_the_method_never_reads_is_refused(cli, tmp_path):
    r = cli("run", "simplecil", "--dataset", "synthetic", "--quick", "--set", "lr=0.1", "--out", tmp_path)
    assert "simplecil does not use 'lr'" in _one_line(r)


def test_every_string_setting_of_every_method_has_its_choices():
    """Validation is central: a method's free-text setting without declared choices would slip through."""
    import dataclasses
    import typing

    from cilbench.methods import METHODS, load_method

    for name in METHODS.names():
        cls = load_method(name)
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            if hints[f.name] is str and f.name not in cls.Config.FREE_TEXT:  # FREE_TEXT: store names, file paths
                assert f.name in cls.Config.CHOICES, f"{name}.{f.name} has no CHOICES"
                assert getattr(cls.Config(), f.name) in cls.Config.CHOICES[f.name]


@pytest.mark.parametrize("args,message", [
    (["zeroshot-clip", "--set", "templates=foo"], "must be one of auto, ensemble, first, cil"),
    (["finetune", "--set", "mode=half"], "must be one of full, linear"),
    (["cicae", "--set", "kl_scope=all"], "must be one of seen, task"),
])
def test_a_setting_outside_its_choices_is_one_line(cli, tmp_path, args, message):
    r = cli("run", *args, "--dataset", "synthetic", "--quick", "--out", tmp_path)
    assert message in _one_line(r)
