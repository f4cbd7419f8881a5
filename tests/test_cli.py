"""End to end through the CLI: every method on the offline datasets, the record, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _one_line import cli_error as _one_line_error

from cilbench import metrics


def _record(out: Path) -> dict:
    files = [p for p in out.glob("*.json")]
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _no_leftovers(out: Path) -> None:
    if out.exists():
        left = [p for p in out.rglob("*") if p.is_file() and (p.suffix == ".json" or ".tmp" in p.name)]
        assert not left, left


@pytest.mark.parametrize("method,args", [
    ("simplecil", []),
    ("finetune", []),
    ("finetune", ["--set", "mode=linear", "--set", "loss_scope=seen"]),
    ("joint", []),
    ("zeroshot-clip", []),
])
def test_run_each_method_on_synthetic(cli, tmp_path, method, args):
    out = tmp_path / "res"
    r = cli("run", method, "--dataset", "synthetic", "--quick", "--out", out, *args)
    assert r.code == 0, r.err + r.out
    rec = _record(out)
    assert rec["schema_version"] == 2 and rec["status"] == "complete"
    assert rec["method"] == method and rec["dataset"] == "synthetic" and rec["kind"] == "cil"
    assert rec["profile"] == "quick" and rec["comparable"] is False
    n = 1 if method == "joint" else 4  # synthetic: 20 classes, default B0Inc5
    assert rec["increments"] == ([20] if method == "joint" else [5, 5, 5, 5])
    m = np.array([[np.nan if v is None else v for v in row] for row in rec["accuracy_matrix"]])
    assert m.shape == (n, n)
    assert np.isnan(m[np.triu_indices(n, 1)]).all() and not np.isnan(m[np.tril_indices(n)]).any()
    again = metrics.cil_metrics(rec["accuracy_matrix"], rec["test_counts"])
    assert rec["metrics"]["A_last"] == pytest.approx(again["A_last"])
    assert rec["metrics"]["A_avg"] == pytest.approx(np.mean(rec["accuracy_per_task"]))
    for key in ("config", "seed", "versions", "git", "timings", "device", "class_order", "backbone"):
        assert key in rec
    assert rec["seed"] == 1993 and rec["backbone"] in ("vit-tiny", "clip-tiny")
    assert len(rec["timings"]["tasks"]) == n
    assert all(t["eval_images_per_s"] > 0 for t in rec["timings"]["tasks"])
    assert "A_avg" in r.out and str(out) in r.out.replace("\n", "")
    if method == "simplecil":  # class structure is real: prototypes beat chance (5%) by far
        assert rec["metrics"]["A_last"] > 30


def test_zeroshot_clip_fills_the_full_mtil_matrix(cli, tmp_path):
    out = tmp_path / "res"
    r = cli("run", "zeroshot-clip", "--dataset", "synthetic-mtil", "--quick", "--out", out)
    assert r.code == 0, r.err + r.out
    rec = _record(out)
    assert rec["kind"] == "mtil" and rec["scenario"] == "order-I"
    m = np.array(rec["accuracy_matrix"], dtype=float)
    assert m.shape == (4, 4) and not np.isnan(m).any()
    assert np.allclose(m, m[0])  # no training: every row is the same
    # the frozen image tower encodes each test image at most once over the 4 rows (not once per row)
    tasks = rec["timings"]["tasks"]
    assert all(t["features_encoded"] + t["features_reused"] == sum(rec["test_counts"]) for t in tasks)
    assert sum(t["features_encoded"] for t in tasks) <= sum(rec["test_counts"])
    expected = metrics.mtil_metrics(rec["accuracy_matrix"])
    assert rec["metrics"]["transfer"] == pytest.approx(expected["transfer"])
    assert rec["metrics"]["last"] == pytest.approx(m[-1].mean())
    assert "Transfer" in r.out


def test_run_on_digits(cli, tmp_path):
    r = cli("run", "simplecil", "--dataset", "digits", "--quick", "--out", tmp_path)
    assert r.code == 0, r.err
    rec = _record(tmp_path)
    assert rec["increments"] == [2] * 5 and rec["scenario"] == "B0Inc2"
    assert rec["metrics"]["A_last"] > 20  # ten real digit classes, a random tiny ViT: above chance


def test_methods_and_datasets_listing(cli):
    r = cli("methods", "list")
    assert r.code == 0 and "simplecil" in r.out and "zeroshot-clip" in r.out
    r = cli("methods", "info", "finetune", "--json")
    info = json.loads(r.out)
    assert info["defaults"]["batch_size"] == 128 and info["default_backbone"] == "vit-b16-in21k"
    r = cli("datasets", "list")
    assert r.code == 0 and "imagenet-a" in r.out and "mtil" in r.out
    r = cli("datasets", "info", "imagenet-a", "--json")
    info = json.loads(r.out)
    assert info["num_classes"] == 200 and "barkermrl/imagenet-a" in info["source"]


@pytest.mark.parametrize("args,message", [
    (["run", "simplecill", "--dataset", "synthetic"], "did you mean 'simplecil'"),
    (["run", "simplecil", "--dataset", "synthetik"], "did you mean 'synthetic'"),
    (["run", "simplecil", "--dataset", "synthetic", "--backbone", "vit-b16-in22k"], "did you mean 'vit-b16-in21k'"),
    (["run", "simplecil", "--dataset", "synthetic", "--scenario", "B0Inc"], "malformed scenario"),
    (["run", "simplecil", "--dataset", "synthetic", "--scenario", "B30Inc5"], "does not fit"),
    (["run", "finetune", "--dataset", "synthetic", "--set", "lrr=0.1"], "did you mean 'lr'"),
    (["run", "finetune", "--dataset", "synthetic", "--set", "lr=fast"], "expected float"),
    (["run", "finetune", "--dataset", "synthetic", "--set", "lr"], "key=value"),
    (["run", "finetune", "--dataset", "synthetic-mtil"], "cannot score datasets"),
    (["run", "zeroshot-clip", "--dataset", "synthetic", "--backbone", "vit-tiny"], "needs a clip backbone"),
    (["run", "simplecil", "--dataset", "synthetic", "--device", "tpu"], "unknown device"),
    (["datasets", "prepare", "cifar100", "--source", "/nonexistent/folder"], "/nonexistent/folder"),
    (["datasets", "split", "mtil", "--order", "III"], "unknown order"),
    (["metrics", "/nonexistent.json"], "no such file"),
    (["datasets", "prepare", "cifar100"], "--source PATH"),  # the hub is unreachable (offline)
    (["datasets", "prepare", "objectnet"], "no hub source"),
    (["run", "simplecil", "--dataset", "synthetic"], "cannot reach the model hub"),  # real weights, offline
    (["run", "simplecil", "--dataset", "synthetic", "--weights", "/nonexistent.pt"], "no weights file"),
    (["run", "finetune", "--dataset", "synthetic", "--quick", "--set", "lr=1e30"], "training diverged"),
])
def test_bad_input_is_one_line(cli, tmp_path, args, message):
    out = tmp_path / "res"
    r = cli(*args, "--out", out) if args[0] == "run" else cli(*args)
    assert message in _one_line_error(r)
    _no_leftovers(out)


def test_cuda_requested_without_gpu(cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = cli("run", "simplecil", "--dataset", "synthetic", "--device", "cuda", "--out", tmp_path)
    assert "no CUDA device" in _one_line_error(r)


def test_unprepared_hub_dataset(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("CILBENCH_CACHE", str(tmp_path / "empty-cache"))
    r = cli("run", "simplecil", "--dataset", "cifar100", "--quick", "--out", tmp_path / "res")
    assert "cilbench datasets prepare cifar100" in _one_line_error(r)
    _no_leftovers(tmp_path / "res")


def test_corrupted_store(cli, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CILBENCH_CACHE", str(cache))
    assert cli("datasets", "prepare", "digits").code == 0
    images = cache / "digits" / "train.images.u8"
    data = bytearray(images.read_bytes())
    images.write_bytes(bytes(data[:-10]))  # truncated
    r = cli("run", "simplecil", "--dataset", "digits", "--quick", "--out", tmp_path / "res")
    assert "corrupted store" in _one_line_error(r)
    _no_leftovers(tmp_path / "res")
    data[100] ^= 0xFF  # same size, one byte flipped
    images.write_bytes(bytes(data))
    (cache / "digits" / ".verified.json").unlink(missing_ok=True)
    r = cli("run", "simplecil", "--dataset", "digits", "--quick", "--out", tmp_path / "res")
    assert "checksum" in _one_line_error(r)


def test_metrics_command(cli, tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([[90, None], [80, 70]]))
    r = cli("metrics", path, "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["A_last"] == pytest.approx(75.0) and out["A_avg"] == pytest.approx((90 + 75) / 2)
    assert out["forgetting"] == pytest.approx(10.0)
    r = cli("metrics", path, "--kind", "foo")
    assert "cil or mtil" in _one_line_error(r)


def test_table_and_check_commands(cli, tmp_path):
    out = tmp_path / "res"
    assert cli("run", "simplecil", "--dataset", "synthetic", "--quick", "--out", out).code == 0
    r = cli("table", "--results", out, "--format", "markdown")
    assert r.code == 0 and "simplecil [quick]" in r.out and "synthetic B0Inc5 A_avg" in r.out
    r = cli("table", "--results", out, "--format", "csv", "--output", tmp_path / "t.csv")
    assert r.code == 0 and (tmp_path / "t.csv").read_text().startswith("method")
    assert cli("check", "--results", out, "--against", out).code == 0  # equal to itself
    worse = tmp_path / "worse"
    worse.mkdir()
    rec = _record(out)
    rec["metrics"]["A_last"] -= 5.0
    (worse / "r.json").write_text(json.dumps(rec))
    r = cli("check", "--results", worse, "--against", out, "--tolerance", "1")
    assert r.code == 1 and "regressed" in r.out
    assert cli("check", "--results", worse, "--against", out, "--tolerance", "6").code == 0
    r = cli("check", "--results", out, "--against", "paper")  # quick runs are never compared with papers
    assert r.code == 1 and "nothing compared" in r.err
    r = cli("table", "--results", tmp_path / "nowhere")
    assert "no results folder" in _one_line_error(r)


@pytest.mark.parametrize("args", [(), ("methods",), ("datasets",)])
def test_no_arguments_prints_help_without_a_traceback(cli, args):
    res = cli(*args)
    assert res.code == 0 and "Usage" in res.out + res.err and "Traceback" not in res.out + res.err


def test_method_info_prints_the_paper_text_and_brackets_verbatim(cli):
    res = cli("methods", "info", "aper-adapter")
    assert res.code == 0 and "Adapt once" in res.out  # the module docstring, where the method is described
    listing = cli("methods", "list")
    assert "[pre-trained" in listing.out  # rich markup would have swallowed the bracketed text
