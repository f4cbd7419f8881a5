"""Raw store vs a JPEG store: disk per image and time to deliver one training batch.

The store (``cilbench.data.store``) keeps every image as raw uint8 ``S x S x 3`` (196 KiB at S = 256). A compressed
store would keep JPEG bytes (one concatenated blob + an offsets array) and decode each batch, on CPU threads or on
the GPU (nvJPEG through ``torchvision.io.decode_jpeg(list, device="cuda")``). ``bench_store`` measures, on synthetic
photo-like images:

* disk: bytes per image, total, ratio vs raw and the projection to 100k images, per format;
* time per batch of shuffled rows, median of ``reps`` after one warm-up batch, for raw memmap gather
  (``engine.loader.gather``, what ``BatchStream`` reads with), torchvision CPU decode (one batched call, and a
  thread pool of 1 and of ``threads`` workers each decoding a slice), PIL decode per image (1 and ``threads``
  workers), and on CUDA the batched nvJPEG decode;
* whether a decoder releases the GIL (a Python loop in this thread keeps turning while it decodes a large JPEG);
* for each step time in ``step_ms``, the decode workers each path needs to keep data wait under 5 %.

Files are written just before they are read, so reads come from the page cache: cold-disk reads are not timed; the
read bandwidth each format needs at a step time is reported instead.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cilbench.engine.loader import gather

PROJECT_IMAGES = 100_000
WAIT_LIMIT = 0.05  # data wait allowed, as a fraction of step time
# Step times (ms) of ViT-B/16, batch 128: H100/H200 bf16 is the figure; the CPU one was measured on the 2-core
# dev box (bf16 autocast, forward + backward + SGD at batch 8 = 2.8 s, scaled linearly to 128).
DEFAULT_STEP_MS = {"H100/H200 ViT-B/16 b128 bf16": 130.0, "2-core CPU ViT-B/16 b128": 45_000.0}


def _decode_jpeg(*args: Any, **kwargs: Any) -> Any:
    """``torchvision.io.decode_jpeg`` without its torchvision 0.29 deprecation warning (it points to TorchCodec)."""
    from torchvision.io import decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(*args, **kwargs)


def synthetic_photos(n: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """``n`` photo-like uint8 ``[n, size, size, 3]`` images, deterministic from ``seed``: a two-colour gradient, 3-7
    elliptical objects with soft to sharp edges, a 1/f luminance texture (the amplitude spectrum of natural images)
    and sensor-like pixel noise. At 256 px, quality 90 (4:2:0) they encode to about 17-31 KB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    f = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :])
    f[0, 0] = 1.0
    amplitude = f ** -0.8
    amplitude[0, 0] = 0.0
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        angle = rng.uniform(0, 2 * np.pi)
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        t = np.cos(angle) * x + np.sin(angle) * y
        t = (t - t.min()) / (t.max() - t.min())
        img = c0 + (c1 - c0) * t[..., None]
        for _ in range(int(rng.integers(3, 8))):
            cx, cy = rng.uniform(0, 1, 2)
            sx, sy = rng.uniform(0.05, 0.3, 2)
            th = rng.uniform(0, np.pi)
            u = ((x - cx) * np.cos(th) + (y - cy) * np.sin(th)) / sx
            v = ((y - cy) * np.cos(th) - (x - cx) * np.sin(th)) / sy
            mask = 1.0 / (1.0 + np.exp((np.hypot(u, v) - 1.0) * rng.uniform(4, 30)))
            img = img * (1 - mask[..., None]) + rng.uniform(0, 1, 3) * mask[..., None]
        shape = (size, size // 2 + 1)
        spectrum = amplitude * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
        texture = np.fft.irfft2(spectrum, s=(size, size))
        texture /= texture.std() + 1e-8
        img = img + rng.uniform(0.03, 0.09) * texture[..., None] * rng.uniform(0.6, 1.0, 3)
        img = img * 255.0 + rng.normal(0.0, 2.0, (size, size, 3))
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def encode_jpegs(images: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """JPEG-encode every image with PIL (libjpeg-turbo, 4:2:0, no optimize): the concatenated bytes (uint8) and the
    int64 offsets ``[N + 1]`` (image ``i`` is ``blob[offsets[i]:offsets[i + 1]]``), as a compressed store lays out."""
    from PIL import Image

    chunks, offsets = [], [0]
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=2)
        chunks.append(buf.getvalue())
        offsets.append(offsets[-1] + len(chunks[-1]))
    return np.frombuffer(b"".join(chunks), np.uint8), np.asarray(offsets, np.int64)


def jpeg_tensors(blob: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> list[torch.Tensor]:
    """The encoded bytes of ``rows`` as 1-D uint8 tensors (copied out of the blob, as a read from disk would)."""
    return [torch.from_numpy(np.array(blob[offsets[r]:offsets[r + 1]])) for r in rows]


def decode_torchvision(data: list[torch.Tensor], workers: int = 0, pool: ThreadPoolExecutor | None = None
                       ) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` on CPU: one batched ``decode_jpeg`` call (``workers`` 0), else ``workers`` contiguous
    slices decoded concurrently by ``pool``."""
    if workers <= 0:
        return torch.stack(_decode_jpeg(data))
    step = -(-len(data) // workers)
    parts = pool.map(_decode_jpeg, [data[i:i + step] for i in range(0, len(data), step)])
    return torch.stack([img for part in parts for img in part])


def decode_pil(data: list[bytes], workers: int = 0, pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]``: each image opened and decoded by PIL (the PILOT loader's way), serially (``workers`` 0)
    or by ``workers`` threads, into one preallocated batch."""
    from PIL import Image

    first = np.asarray(Image.open(io.BytesIO(data[0])).convert("RGB"))
    out = np.empty((len(data),) + first.shape, np.uint8)
    out[0] = first

    def one(i: int) -> None:
        out[i] = np.asarray(Image.open(io.BytesIO(data[i])).convert("RGB"))

    if workers <= 0:
        for i in range(1, len(data)):
            one(i)
    else:
        list(pool.map(one, range(1, len(data))))
    return torch.from_numpy(out)


def _times_ms(fn: Callable[[int], Any], reps: int) -> tuple[float, float]:
    """Median and minimum wall time (ms) of ``fn(k)`` over ``reps`` calls after one warm-up call (``k`` = batch
    number). On a shared machine the minimum is the least disturbed figure."""
    fn(0)
    times = []
    for k in range(1, reps + 1):
        t0 = time.perf_counter()
        fn(k)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def gil_stall_ms(fn: Callable[[], Any]) -> tuple[float, float]:
    """Run one long call ``fn()`` in another thread while this thread spins on a Python loop: returns (the longest gap
    between two loop turns, ms; the call's duration, ms). A call that releases the GIL leaves gaps of a scheduler
    slice or a switch interval (a few ms); one that holds it stalls this thread for about its whole duration. Unlike
    a throughput ratio this holds on a busy machine with no free core. One untimed call first (lazy set-up)."""
    fn()
    done = threading.Event()
    span = [0.0]

    def call() -> None:
        t0 = time.perf_counter()
        fn()
        span[0] = (time.perf_counter() - t0) * 1e3
        done.set()

    worker = threading.Thread(target=call, daemon=True)
    last = time.perf_counter()
    worker.start()
    longest = 0.0
    while not done.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    return longest * 1e3, span[0]


def _big_jpeg(images: np.ndarray, tiles: int = 12) -> bytes:
    """One large JPEG (``tiles x tiles`` stored images side by side), so that a single decode call lasts long
    (~0.1-0.3 s) compared with the scheduler's slices."""
    from PIL import Image

    picks = np.resize(np.arange(min(len(images), tiles * tiles)), tiles * tiles)
    rows = [np.concatenate(list(images[picks[r * tiles:(r + 1) * tiles]]), axis=1) for r in range(tiles)]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _sort_in_c(values: list[int]) -> None:
    """A long C-level call that holds the GIL throughout (``sorted`` of plain ints): the 'held' reference."""
    sorted(values)


def workers_needed(decode_ms: float, step_ms: float) -> dict[str, int]:
    """Decode workers (linear scaling from the 1-worker time ``decode_ms`` per batch) for data wait < 5 % of a step:
    ``strict``: decode / workers < 0.05 x step, the issue's rule (holds even with no overlap at all);
    ``overlapped``: with prefetch overlapping decode and compute the wait per step is max(0, decode / workers - step),
    so wait / (step + wait) < 0.05 needs decode / workers < step / 0.95."""
    return {"strict": max(1, math.floor(decode_ms / (WAIT_LIMIT * step_ms)) + 1),
            "overlapped": max(1, math.floor(decode_ms * (1 - WAIT_LIMIT) / step_ms) + 1)}


def bench_store(images: int = 512, size: int = 256, batch_size: int = 128, qualities: tuple[int, ...] = (90, 95),
                threads: int | None = None, device: torch.device = torch.device("cpu"), seed: int = 0,
                reps: int = 7, step_ms: dict[str, float] | float | None = None,
                workdir: str | Path | None = None, gil_tiles: int = 12) -> dict[str, Any]:
    """Write ``images`` synthetic photos as a raw store and as JPEG at each quality, then time each way of making one
    training batch of ``batch_size`` shuffled rows (see the module docstring). Returns a dict with ``config``,
    ``disk`` (per format), ``timing`` (per path: ms per batch, images/s), ``gil`` (per decoder) and ``workers``
    (per step time, per path). Each batch is timed alone, on ``threads`` CPU threads (default: the usable cores)."""
    threads = threads or len(os.sched_getaffinity(0))
    device = torch.device(device)
    cuda = device.type == "cuda"
    if step_ms is None:
        step_ms = DEFAULT_STEP_MS
    elif not isinstance(step_ms, dict):
        step_ms = {"given": float(step_ms)}
    batch_size = min(batch_size, images)
    pixels = synthetic_photos(images, size, seed)
    order = np.random.default_rng(seed + 1).permutation(images)
    per_epoch = images // batch_size

    def rows_of(k: int) -> np.ndarray:  # batch k of a shuffled epoch (epochs repeat when reps exceed one)
        k %= per_epoch
        return order[k * batch_size:(k + 1) * batch_size]

    def to_device(t: torch.Tensor) -> torch.Tensor:
        if not cuda:
            return t
        t = t.pin_memory().to(device, non_blocking=True)
        torch.cuda.synchronize(device)
        return t

    old_threads = torch.get_num_threads()
    result: dict[str, Any] = {"config": {"images": images, "size": size, "batch_size": batch_size,
                                         "threads": threads, "device": str(device), "reps": reps, "seed": seed,
                                         "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0))},
                              "disk": {}, "timing": {}, "gil": {}, "workers": {}}
    with tempfile.TemporaryDirectory(prefix="cilbench-bench-store-", dir=workdir) as tmp:
        raw_path = Path(tmp) / "train.images.u8"
        raw = np.memmap(raw_path, np.uint8, "w+", shape=pixels.shape)
        raw[:] = pixels
        raw.flush()
        raw = np.memmap(raw_path, np.uint8, "r", shape=pixels.shape)
        raw_per_image = size * size * 3
        result["disk"]["raw"] = {"bytes_per_image": raw_per_image, "total_bytes": raw_path.stat().st_size,
                                 "ratio_vs_raw": 1.0, "projected_100k_bytes": raw_per_image * PROJECT_IMAGES}
        jpegs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for q in qualities:
            blob, offsets = encode_jpegs(pixels, q)
            (Path(tmp) / f"train.q{q}.jpg.bin").write_bytes(blob.tobytes())
            np.save(Path(tmp) / f"train.q{q}.offsets.npy", offsets)
            blob = np.memmap(Path(tmp) / f"train.q{q}.jpg.bin", np.uint8, "r")
            jpegs[q] = (blob, offsets)
            total = int(offsets[-1]) + offsets.nbytes
            sizes = np.diff(offsets)
            result["disk"][f"jpeg q{q}"] = {
                "bytes_per_image": total / images, "total_bytes": total, "ratio_vs_raw": raw_per_image * images / total,
                "projected_100k_bytes": round(total / images * PROJECT_IMAGES),
                "min_bytes": int(sizes.min()), "max_bytes": int(sizes.max())}

        timing = result["timing"]

        def record(name: str, fn: Callable[[int], Any], workers: int) -> None:
            ms, best = _times_ms(fn, reps)
            timing[name] = {"ms_per_batch": ms, "min_ms": best, "images_per_s": batch_size / ms * 1e3,
                            "workers": workers}

        try:
            torch.set_num_threads(1)
            record("raw memmap gather", lambda k: to_device(gather(raw, rows_of(k))), 1)
            for q, (blob, offsets) in jpegs.items():
                data = [jpeg_tensors(blob, offsets, rows_of(k)) for k in range(per_epoch)]
                as_bytes = [[t.numpy().tobytes() for t in batch] for batch in data]
                torch.set_num_threads(threads)
                record(f"q{q} torchvision batched call ({threads} torch thr)",
                       lambda k: to_device(decode_torchvision(data[k % per_epoch])), 1)
                torch.set_num_threads(1)
                for w in sorted({1, threads}):
                    with ThreadPoolExecutor(w) as pool:
                        record(f"q{q} torchvision pool x{w}",
                               lambda k: to_device(decode_torchvision(data[k % per_epoch], w, pool)), w)
                        record(f"q{q} PIL per image pool x{w}",
                               lambda k: to_device(decode_pil(as_bytes[k % per_epoch], w, pool)), w)
                record(f"q{q} PIL per image serial", lambda k: to_device(decode_pil(as_bytes[k % per_epoch])), 1)
                if cuda:
                    def gpu(k: int) -> torch.Tensor:
                        out = torch.stack(_decode_jpeg(data[k % per_epoch], device=device))
                        torch.cuda.synchronize(device)
                        return out
                    record(f"q{q} nvJPEG batched (cuda)", gpu, 0)
                if q == max(jpegs):
                    big = _big_jpeg(pixels, gil_tiles)
                    big_t = torch.frombuffer(bytearray(big), dtype=torch.uint8)
                    numbers = np.random.default_rng(seed).integers(0, 1 << 40, 40_000 * gil_tiles).tolist()
                    checks = {"torchvision decode_jpeg": lambda: _decode_jpeg(big_t),
                              "PIL decode": lambda: decode_pil([big]),
                              "sorted() (holds GIL, reference)": lambda: _sort_in_c(numbers)}
                    for name, fn in checks.items():
                        stall, span = gil_stall_ms(fn)
                        result["gil"][name] = {"longest_stall_ms": stall, "call_ms": span,
                                               "releases_gil": stall < 0.5 * span}
        finally:
            torch.set_num_threads(old_threads)

    ref = {}  # the one-worker time of each decoder, the base of the worker counts
    for name, t in timing.items():
        if name.endswith(" x1") or name.startswith("raw") or "cuda" in name:
            ref[name] = t["ms_per_batch"]
    for label, ms in step_ms.items():
        rows = {}
        for name, decode_ms in ref.items():
            if "cuda" in name:  # runs on the GPU itself: its time adds to the step unless on a side stream
                rows[name] = {"gpu_fraction_of_step": decode_ms / ms}
                continue
            rows[name] = workers_needed(decode_ms, ms)
            rows[name]["serial_wait_fraction"] = decode_ms / ms
        result["workers"][label] = {"step_ms": ms, "paths": rows}
    for fmt, d in result["disk"].items():
        per_batch = d["bytes_per_image"] * batch_size
        d["read_MBps_at_step"] = {label: per_batch / ms * 1e3 / 1e6 for label, ms in step_ms.items()}
    return result


def format_table(result: dict[str, Any]) -> str:
    """The result of ``bench_store`` as readable text tables."""
    c = result["config"]
    lines = [f"bench_store: {c['images']} images {c['size']}px, batch {c['batch_size']}, {c['threads']} threads "
             f"({c['cpus']} usable cpus), device {c['device']}, median of {c['reps']}, torch {c['torch']}", "",
             f"{'format':<10} {'KB/image':>9} {'min-max KB':>12} {'ratio':>6} {'100k images':>12}  read MB/s at step"]
    for fmt, d in result["disk"].items():
        span = f"{d['min_bytes'] / 1e3:.0f}-{d['max_bytes'] / 1e3:.0f}" if "min_bytes" in d else ""
        bw = ", ".join(f"{v:.0f} ({k.split()[0]})" for k, v in d["read_MBps_at_step"].items())
        lines.append(f"{fmt:<10} {d['bytes_per_image'] / 1e3:>9.1f} {span:>12} {d['ratio_vs_raw']:>6.1f} "
                     f"{d['projected_100k_bytes'] / 1e9:>10.2f} GB  {bw}")
    lines += ["", f"{'path':<46} {'ms/batch':>9} {'min ms':>7} {'images/s':>9}"]
    for name, t in result["timing"].items():
        lines.append(f"{name:<46} {t['ms_per_batch']:>9.1f} {t['min_ms']:>7.1f} {t['images_per_s']:>9.0f}")
    lines += ["", "GIL: longest stall of a Python loop while another thread runs one long call:"]
    for name, g in result["gil"].items():
        verdict = "released" if g["releases_gil"] else "HELD"
        lines.append(f"  {name:<34} stall {g['longest_stall_ms']:>7.1f} ms in a {g['call_ms']:>7.1f} ms call: "
                     f"{verdict}")
    for label, w in result["workers"].items():
        lines += ["", f"workers for data wait < 5% at step {w['step_ms']:.0f} ms ({label}):",
                  f"  {'path (1-worker time)':<44} {'strict':>7} {'overlap':>8} {'serial wait':>12}"]
        for name, r in w["paths"].items():
            if "gpu_fraction_of_step" in r:
                lines.append(f"  {name:<44} {'GPU time':>7} {'':>8} {r['gpu_fraction_of_step']:>11.1%}")
            else:
                lines.append(f"  {name:<44} {r['strict']:>7} {r['overlapped']:>8} {r['serial_wait_fraction']:>11.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m cilbench.bench_store [images] [threads ...]``: one table per thread count (default: 1 and all)."""
    argv = sys.argv[1:] if argv is None else argv
    images = int(argv[0]) if argv else 512
    cpus = len(os.sched_getaffinity(0))
    counts = [int(a) for a in argv[1:]] or sorted({1, cpus})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for n in counts:
        print(format_table(bench_store(images=images, threads=n, device=device)), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
