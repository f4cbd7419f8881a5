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


def test_bench_compare_naive_times_both_pipelines_end_to_end(cli):
    """Ours (uint8 store, device transform, batched experts) against the PILOT-style JPEG DataLoader (float32,
    sequential experts), with one loader process; the ratios are the quotients of the reported images/s."""
    res = cli("bench", "cicae", "--backbone", "vit-tiny", "--steps", "1", "--warmup", "0", "--compare-naive",
              "--workers", "1", "--json")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert [m["mode"] for m in out["modes"]] == ["batched", "sequential"]  # the usual result is all still there
    cmp = out["compare_naive"]
    ours, naive = cmp["ours"], cmp["naive"]
    assert (ours["batched_experts"], naive["batched_experts"]) == (True, False)
    assert (ours["precision"], naive["precision"]) == ("float32", "float32")  # bf16 on CUDA only
    assert cmp["jpeg_quality"] == 95 and cmp["workers"] == 1 and cmp["images"] == 32 and cmp["image_size"] == 36
    for r in (ours, naive):
        assert r["train_images_per_s"] > 0 and r["infer_images_per_s"] > 0 and r["train_tflops"] > 0
        assert 0 <= r["train_data_wait"] < 1 and 0 <= r["infer_data_wait"] < 1
        assert r["train_fraction_of_peak"] > 0
    assert abs(ours["train_gflop_per_image"] - naive["train_gflop_per_image"]) < 0.01 * naive["train_gflop_per_image"]
    assert cmp["ratio"] == {"train": round(ours["train_images_per_s"] / naive["train_images_per_s"], 3),
                            "inference": round(ours["infer_images_per_s"] / naive["infer_images_per_s"], 3)}


def test_bench_compare_naive_without_training_and_its_table(cli):
    args = ("bench", "simplecil", "--backbone", "vit-tiny", "--steps", "1", "--warmup", "0", "--compare-naive",
            "--workers", "0")
    res = cli(*args, "--json")
    assert res.code == 0, res.err
    cmp = json.loads(res.out)["compare_naive"]
    assert cmp["ours"]["train_images_per_s"] is None and cmp["naive"]["train_images_per_s"] is None
    assert cmp["ratio"]["train"] is None
    assert cmp["ratio"]["inference"] == round(cmp["ours"]["infer_images_per_s"] / cmp["naive"]["infer_images_per_s"],
                                              3)
    res = cli(*args)
    assert res.code == 0, res.err
    assert "│ ours" in res.out and "│ naive" in res.out and "ours / naive: training x-, inference x" in res.out
