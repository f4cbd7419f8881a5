"""The frozen-feature cache: each image encoded once per encoder state, reused by a second run, never stale."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from cilbench.data.augment import ImageTransform
from cilbench.engine.features import FeatureCache, weights_digest
from cilbench.engine.loader import TaskData
from cilbench.methods.contract import Encoder


def _record(folder: Path) -> dict:
    [path] = Path(folder).glob("*.json")
    return json.loads(path.read_text())


def test_a_second_simplecil_run_encodes_nothing_and_scores_the_same(cli, tmp_path):
    # a seed of its own: the quick backbone's random weights (so the cache key) are this test's alone
    args = ("run", "simplecil", "--dataset", "digits", "--quick", "--seed", "4242")
    first = cli(*args, "--out", tmp_path / "a")
    assert first.code == 0, first.err
    second = cli(*args, "--out", tmp_path / "b")
    assert second.code == 0, second.err
    uncached = cli(*args, "--out", tmp_path / "c", "--no-feature-cache")
    assert uncached.code == 0, uncached.err
    a, b, c = (_record(tmp_path / x) for x in "abc")
    train = [t["train_images"] for t in a["timings"]["tasks"]]  # SimpleCIL trains nothing: these are 0
    assert train == [0] * 5
    tests = a["test_counts"]
    # first run: every image encoded exactly once (its training images for the prototypes, its test images)
    encoded = [t["features_encoded"] for t in a["timings"]["tasks"]]
    reused = [t["features_reused"] for t in a["timings"]["tasks"]]
    per_task_train = [e - n for e, n in zip(encoded, tests)]
    assert all(x > 0 for x in per_task_train)
    assert reused == [sum(tests[:t]) for t in range(5)]  # evaluation t reuses the test images of tasks before t
    # LAMDA-PILOT encodes the training images once and the test images of every seen task after every task
    pilot = sum(per_task_train) + sum(sum(tests[:t + 1]) for t in range(5))
    assert sum(encoded) == sum(per_task_train) + sum(tests) < pilot
    # the second run reads every feature from the cache: nothing is encoded, the numbers are the same
    assert [t["features_encoded"] for t in b["timings"]["tasks"]] == [0] * 5
    assert b["feature_cache"]["encoded_images"] == 0 and b["feature_cache"]["reused_images"] == sum(encoded) + \
        sum(reused)
    assert "reusing features an earlier run cached in" in second.out and "--no-feature-cache" in second.out
    assert f"features {sum(encoded)} encoded / {sum(reused)} reused" in first.out.replace("\n", " ")
    for chunk in b["feature_cache"]["chunks_read"]:  # every chunk read is named with its sha256
        assert hashlib.sha256(Path(chunk["file"]).read_bytes()).hexdigest() == chunk["sha256"]
    assert sum(c["rows"] for c in b["feature_cache"]["chunks_read"]) == sum(encoded)
    assert a["accuracy_matrix"] == b["accuracy_matrix"] == c["accuracy_matrix"]
    assert c["feature_cache"] is None and c["run"]["feature_cache"] is False
    assert "features_encoded" not in c["timings"]["tasks"][0]


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 4)

    def forward(self, x):
        return self.proj(x.float().mean(dim=(2, 3)).repeat(1, 4))


@pytest.fixture
def toy():
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    model = _Toy().eval()
    enc = Encoder("toy", model, (model,))
    transform = ImageTransform(size=8, eval_crop=1.0)
    return images, model, enc, transform


def _data(images, rows):
    return TaskData(images, np.asarray(rows, dtype=np.int64), np.zeros(len(rows), dtype=np.int64))


def test_features_equal_the_encoder_and_only_missing_rows_run(toy, tmp_path):
    images, model, enc, transform = toy
    cache = FeatureCache(tmp_path, torch.device("cpu"))
    cache.register(images, "toy:abc:test")
    got = cache.features(enc, _data(images, [3, 1, 4]), transform, batch_size=2)
    with torch.no_grad():
        want = model(transform(torch.from_numpy(images[[3, 1, 4]]), train=False))
    torch.testing.assert_close(got, want)
    assert cache.stats.encoded == 3
    cache.features(enc, _data(images, [1, 5, 9, 4]), transform, batch_size=2)
    assert (cache.stats.encoded, cache.stats.reused) == (5, 2)  # 1 and 4 known, 5 and 9 new
    # an array never registered (a memory across stores) is encoded every time
    other = images.copy()
    cache.features(enc, _data(other, [0, 1]), transform, batch_size=2)
    cache.features(enc, _data(other, [0, 1]), transform, batch_size=2)
    assert cache.stats.encoded == 9


def test_any_change_of_weights_transform_or_data_is_a_new_key(toy, tmp_path):
    images, model, enc, transform = toy
    cache = FeatureCache(tmp_path, torch.device("cpu"))
    cache.register(images, "toy:abc:test")
    key = cache.key(enc, "toy:abc:test", transform, "float32")
    before, value = weights_digest(enc.tensors()), float(model.proj.weight.data[0, 0])
    model.proj.weight.data[0, 0] = 1.5  # a write torch's version counter does not see
    assert weights_digest(enc.tensors()) != before
    assert cache.key(enc, "toy:abc:test", transform, "float32") != key
    model.proj.weight.data[0, 0] = value
    assert cache.key(enc, "toy:abc:test", transform, "float32") == key
    assert cache.key(enc, "toy:abd:test", transform, "float32") != key  # another store content
    assert cache.key(enc, "toy:abc:test", ImageTransform(size=8, eval_crop=0.5), "float32") != key
    assert cache.key(enc, "toy:abc:test", transform, "bf16-autocast") != key
    # after a change the features are computed again, under the new key
    cache.features(enc, _data(images, [0, 1]), transform, batch_size=4)
    with torch.no_grad():
        model.proj.bias.add_(1.0)
    after = cache.features(enc, _data(images, [0, 1]), transform, batch_size=4)
    assert cache.stats.encoded == 4
    with torch.no_grad():
        torch.testing.assert_close(after, model(transform(torch.from_numpy(images[[0, 1]]), train=False)))


def test_a_later_process_reads_the_chunks_and_skips_a_malformed_one_with_a_word(toy, tmp_path):
    images, model, enc, transform = toy
    FeatureCache(tmp_path, torch.device("cpu")).register(images, "x")  # nothing happens without a lookup
    first = FeatureCache(tmp_path, torch.device("cpu"))
    first.register(images, "toy:abc:test")
    want = first.features(enc, _data(images, [2, 7]), transform, batch_size=4)
    [folder] = {p.parent for p in tmp_path.rglob("chunk-*.npz")}
    assert json.loads((folder / "key.json").read_text())["encoder"] == "toy"
    np.savez(folder / "chunk-bad.npz", rows=np.array([2.0, 7.0]), feats=np.zeros((2, 4), dtype=np.float32))
    (folder / "chunk-junk.npz").write_bytes(b"not a zip")
    warnings: list[str] = []
    later = FeatureCache(tmp_path, torch.device("cpu"), warn=warnings.append)
    later.register(images, "toy:abc:test")
    got = later.features(enc, _data(images, [7, 2]), transform, batch_size=4)
    assert torch.equal(got, want[[1, 0]]) and later.stats.encoded == 0
    assert len(later.stats.skipped) == 2 and len(warnings) == 2 and all("skipping" in w for w in warnings)
    assert len(later.stats.chunks_read) == 1


def test_the_folder_stays_under_its_bound_by_dropping_the_keys_unused_longest(toy, tmp_path):
    images, model, enc, transform = toy
    cache = FeatureCache(tmp_path, torch.device("cpu"), limit_bytes=0)  # every other key must go
    for source in ("toy:a:test", "toy:b:test"):
        cache.register(images, source)
        cache.features(enc, _data(images, [0, 1]), transform, batch_size=4)
    assert len(list(tmp_path.glob("??/*"))) == 2  # both are this run's: kept
    later = FeatureCache(tmp_path, torch.device("cpu"), limit_bytes=0)
    later.register(images, "toy:c:test")
    later.features(enc, _data(images, [0]), transform, batch_size=4)
    [kept] = tmp_path.glob("??/*")
    assert json.loads((kept / "key.json").read_text())["source"] == "toy:c:test"
