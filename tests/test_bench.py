"""``cilbench bench``: real numbers from the real step functions, both expert modes for CICAE."""

from __future__ import annotations

import json

import pytest


def test_bench_cicae_times_batched_and_sequential_experts(cli):
    res = cli("bench", "cicae", "--backbone", "vit-tiny", "--steps", "1", "--warmup", "1", "--json")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["backbone"] == "vit-tiny" and out["batch_size"] == 8 and out["device"] == "cpu"
    batched, sequential = out["modes"]
    assert (batched["mode"], sequential["mode"]) == ("batched", "sequential")
    for m in (batched, sequential):
        assert m["train_images_per_s"] > 0 and m["infer_images_per_s"] > 0 and m["peak_memory_mb"] > 0
    # the same arithmetic either way: three experts' forward (and backward through the adapters)
    assert batched["infer_gflop_per_image"] == sequential["infer_gflop_per_image"] > 0
    assert abs(batched["train_gflop_per_image"] - sequential["train_gflop_per_image"]) < 0.01 * \
        batched["train_gflop_per_image"]
    ratio = out["batched_over_sequential"]
    assert ratio["train"] > 0 and ratio["inference"] > 0
    assert out["matmul_peak_tflops"] > 0


def test_bench_a_method_without_training_and_the_table(cli):
    res = cli("bench", "simplecil", "--backbone", "vit-tiny", "--steps", "1", "--warmup", "0")
    assert res.code == 0, res.err
    assert "simplecil on vit-tiny" in res.out and "batched / sequential" not in res.out


def test_bench_unknown_method_is_one_line(cli):
    res = cli("bench", "cicea")
    assert res.code == 2 and "cicae" in res.err and len(res.err.strip().splitlines()) == 1


@pytest.mark.parametrize("method, backbone", [("icarl", "resnet-tiny"), ("podnet", "resnet-tiny"),
                                              ("dne", "vit-tiny"), ("dytox", "vit-tiny"),
                                              ("foster", "resnet-tiny")])
def test_bench_runs_the_first_tasks_before_fit_and_counts_every_forward(cli, method, backbone):
    """Methods that set their training state in ``before_fit`` (iCaRL's old classes, PODNet's teacher) and DNE's
    task tokens, which torch's flop counter cannot hook under no_grad unless their flags are off."""
    res = cli("bench", method, "--backbone", backbone, "--steps", "1", "--warmup", "0", "--json")
    assert res.code == 0, res.err
    [mode] = json.loads(res.out)["modes"]
    assert mode["train_gflop_per_image"] > mode["infer_gflop_per_image"] > 0
