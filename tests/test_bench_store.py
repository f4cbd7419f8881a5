"""bench_store: store layouts and decode paths return the right pixels (timings are not asserted)."""

import numpy as np
import torch

from cilbench.bench_store import (bench_store, decode_pil, decode_torchvision, encode_jpegs, jpeg_tensors,
                                  synthetic_photos, workers_needed)
from cilbench.engine.loader import gather


def test_synthetic_photos_deterministic_and_jpeg_sized_like_photos():
    a = synthetic_photos(4, 256, seed=3)
    assert a.shape == (4, 256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, synthetic_photos(4, 256, seed=3))
    assert not np.array_equal(a, synthetic_photos(4, 256, seed=4))
    _, offsets = encode_jpegs(a, 90)
    sizes = np.diff(offsets)
    assert ((sizes > 12_000) & (sizes < 45_000)).all(), sizes  # realistic q90 size at 256 px


def test_jpeg_round_trip_close_and_raw_exact():
    imgs = synthetic_photos(6, 64, seed=1)
    blob, offsets = encode_jpegs(imgs, 95)
    assert offsets[0] == 0 and offsets[-1] == blob.size and len(offsets) == 7
    rows = np.array([4, 0, 5, 2])
    tv = decode_torchvision(jpeg_tensors(blob, offsets, rows))
    assert tv.shape == (4, 3, 64, 64) and tv.dtype == torch.uint8
    pil = decode_pil([blob[offsets[r]:offsets[r + 1]].tobytes() for r in rows])
    assert pil.shape == (4, 64, 64, 3)
    ref = torch.from_numpy(imgs[rows]).float()
    assert (tv.permute(0, 2, 3, 1).float() - ref).abs().mean() < 4.0  # levels of 255: chroma subsampling + pixel noise
    assert (pil.float() - ref).abs().mean() < 4.0  # levels of 255: chroma subsampling + pixel noise
    assert torch.equal(gather(imgs, rows), torch.from_numpy(imgs[rows]))


def test_workers_needed_rule():
    assert workers_needed(100.0, 130.0) == {"strict": 16, "overlapped": 1}  # 100 / 16 = 6.25 < 6.5
    assert workers_needed(300.0, 130.0)["overlapped"] == 3  # 300 * 0.95 / 130 = 2.19


def test_bench_store_keys():
    r = bench_store(images=8, size=64, batch_size=4, qualities=(90,), threads=2, reps=1, step_ms=130.0,
                    gil_tiles=2)
    assert set(r) == {"config", "disk", "timing", "gil", "workers"}
    assert r["disk"]["raw"]["bytes_per_image"] == 64 * 64 * 3
    assert r["disk"]["raw"]["total_bytes"] == 8 * 64 * 64 * 3
    assert r["disk"]["jpeg q90"]["ratio_vs_raw"] > 1
    assert {"raw memmap gather", "q90 torchvision pool x1", "q90 torchvision pool x2", "q90 PIL per image pool x1",
            "q90 PIL per image serial"} <= set(r["timing"])
    assert all(t["ms_per_batch"] > 0 for t in r["timing"].values())
    assert set(r["gil"]) == {"torchvision decode_jpeg", "PIL decode", "sorted() (holds GIL, reference)"}
    paths = r["workers"]["given"]["paths"]
    assert {"strict", "overlapped"} <= set(paths["q90 torchvision pool x1"])


def test_the_cli_prints_the_tables_and_refuses_a_bad_count_in_one_line(cli):
    res = cli("bench-store", "--images", "8", "--batch-size", "4", "--threads", "1", "--step-ms", "100")
    assert res.code == 0, res.err
    assert "raw memmap gather" in res.out and "q90 torchvision pool x1" in res.out and "at step 100 ms" in res.out
    res = cli("bench-store", "--images", "0")
    assert res.code == 2 and res.err.strip() == "error: --images must be at least 1, not 0"
