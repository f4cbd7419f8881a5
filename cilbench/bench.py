"""``cilbench bench``: throughput of a method's training and inference steps on synthetic data.

The method is built exactly as ``cilbench run`` builds it (same config resolution, same transform on the device,
the trainer's ``train_step``), on a randomly initialised backbone of the asked-for shape, and timed after warm-up.
Reported per mode: images/s for training and inference, peak memory (CUDA: allocator peak; CPU: the process's
peak resident set) and FLOPs per image counted by ``torch.utils.flop_counter``; on CUDA also the achieved TFLOP/s
against the device's own bf16 matmul rate measured on the spot. Methods with a ``batched_experts`` setting
(CICAE) are timed both ways in one run and the ratio is reported.

``compare_naive`` (``--compare-naive``) times the same method's training and inference steps end to end, data
loading included, through two pipelines on the same synthetic images (smooth blobs + noise, stored at the
transform's store size):

* ours: a uint8 [N, S, S, 3] store read by ``BatchStream`` (shuffled, pinned, async copy, prefetch thread), the
  device transform, bf16 autocast and the fused optimiser without a host sync per step on CUDA (``train_step``),
  batched experts where the config has them;
* naive (LAMDA-PILOT style, on purpose): the images JPEG-encoded once (PIL, quality 95) and held as bytes in
  memory (files in the page cache), a ``Dataset`` that decodes each item with PIL and runs torchvision's PIL
  transforms (train RandomResizedCrop + flip, test Resize + CenterCrop; ToTensor; Normalize when the preset has a
  mean / std), a ``DataLoader`` of ``workers`` processes (pinned on CUDA), float32, sequential experts.

Each timed block (``steps`` batches after ``warmup`` untimed ones, its own loader iterator) runs from creating the
loader iterator, so worker start-up is counted once as one epoch counts it, to the device's last kernel. Reported
per pipeline: images/s for training and inference, the data-wait fraction (time blocked on the next batch / block
time), the train step's FLOPs per image (the model's, transform excluded) and TFLOP/s and its fraction of the
measured matmul rate; and the ratios ours / naive of images/s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from cilbench.data.augment import PRESETS, ImageTransform, parse_rand_augment
from cilbench.data.scenario import Task, build_scenario
from cilbench.engine.evaluator import count_flops
from cilbench.engine.loader import BatchStream, TaskData
from cilbench.engine.trainer import autocast, build_optimizer, deferred_guard, train_step
from cilbench.errors import CilbenchError
from cilbench.methods.contract import Batch
from cilbench.models.backbones import BACKBONES, build_backbone
from cilbench.plan import RunOptions, RunPlan

CPU_BACKBONE = "vit-mini"
BENCH_CLASSES = 20


@dataclass
class ModeResult:
    mode: str
    train_images_per_s: float | None
    infer_images_per_s: float
    train_step_ms: float | None
    infer_step_ms: float
    train_gflop_per_image: float | None
    infer_gflop_per_image: float
    train_tflops: float | None
    infer_tflops: float
    peak_memory_mb: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device) -> float:
    """The device's achievable dense matmul rate: bf16 8192^3 on CUDA, float32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps = 10 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def _time(step, warmup: int, steps: int, device: torch.device, update,
          inference_of: torch.nn.Module | None = None) -> tuple[float, float]:
    """Seconds per call of ``step`` after ``warmup`` untimed calls, and its FLOPs (one more, counted) call
    (``inference_of``: the module an inference step runs, see ``count_flops``)."""
    for _ in range(warmup):
        step()
        update(1, 0.0)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
        update(1, 0.0)
    _sync(device)
    return (time.perf_counter() - t0) / steps, count_flops(step, inference_of)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench(method_name: str, backbone: str | None, batch_size: int | None, device: torch.device,
          steps: int | None = None, warmup: int = 2, sets: dict[str, str] | None = None,
          progress=None, compare: bool = False, workers: int | None = None) -> dict[str, Any]:
    """The bench result (see the module docstring); ``compare``: also ``compare_naive`` (with ``workers`` loader
    processes for the naive pipeline, default min(8, CPUs); ``steps`` default 3 on CPU) under the key
    "compare_naive"."""
    for flag, value, low in (("--batch-size", batch_size, 1), ("--steps", steps, 1), ("--warmup", warmup, 0),
                             ("--workers", workers, 0)):
        if value is not None and value < low:
            raise CilbenchError(f"{flag} must be at least {low}, not {value}")
    from cilbench.methods import load_method
    from cilbench.methods.base import METHODS

    load_method(method_name)  # a lazily registered method carries its metadata once imported
    meta = METHODS.metadata(method_name)
    cpu_shapes = {"vit": CPU_BACKBONE, "clip": "clip-tiny", "cnn": "resnet-tiny"}
    name = backbone or (None if device.type == "cuda" else cpu_shapes[meta.get("backbone_family", "vit")])
    # the run's own construction: config, backbone choice and checks, transform preset (a random backbone here)
    plan = RunPlan.build(RunOptions(method_name, "synthetic", backbone=name, sets=dict(sets or {})))
    cls, cfg, name = plan.method_cls, plan.cfg, plan.backbone
    bs = batch_size or (cfg.batch_size if device.type == "cuda" else 8)
    compare_steps = steps or (20 if device.type == "cuda" else 3)  # the comparison's steps also load data
    steps = steps or (20 if device.type == "cuda" else 5)
    modes = [("batched", True), ("sequential", False)] if hasattr(cfg, "batched_experts") else [("default", None)]
    results = []
    for mode, batched in modes:
        mcfg = dataclasses.replace(cfg, batched_experts=batched) if batched is not None else cfg
        results.append(_bench_mode(cls, mcfg, name, plan.transform_preset, bs, device, steps, warmup, mode,
                                   progress))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    naive = compare_naive(cls, cfg, name, plan.transform_preset, bs, device, compare_steps, warmup, workers,
                          progress) if compare else None
    peak = matmul_peak_tflops(device)
    out: dict[str, Any] = {
        "method": method_name, "backbone": name, "batch_size": bs, "steps": steps, "warmup": warmup,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "matmul_peak_tflops": round(peak, 3), "matmul_peak_dtype": "bf16" if device.type == "cuda" else "float32",
        "modes": [dataclasses.asdict(r) for r in results],
    }
    if hasattr(cls, "parameter_report"):  # what the paper's cost table counts (MoE-Adapters Table 5)
        out["parameters"] = cls.parameter_report(cfg, name)
    if len(results) == 2:
        a, b = results
        out["batched_over_sequential"] = {
            "train": round(a.train_images_per_s / b.train_images_per_s, 3)
            if a.train_images_per_s and b.train_images_per_s else None,
            "inference": round(a.infer_images_per_s / b.infer_images_per_s, 3)}
    for r in out["modes"]:
        r["train_fraction_of_peak"] = round(r["train_tflops"] / peak, 4) if r["train_tflops"] else None
        r["infer_fraction_of_peak"] = round(r["infer_tflops"] / peak, 4)
    if naive:
        for r in (naive["ours"], naive["naive"]):
            r["train_fraction_of_peak"] = round(r["train_tflops"] / peak, 4) if r["train_tflops"] else None
        out["compare_naive"] = naive
    return out


class _BenchContext:
    """The task context of bench's one first task (``methods.contract.TaskContext``): its classes, the random batch
    as training data; no phases, references or feature passes (bench times the main step and inference only)."""

    def __init__(self, task: Task, train: TaskData, device: torch.device):
        self.task, self.train, self.device = task, train, device
        self.seen = self.new = torch.tensor(task.classes, device=device)
        self.old = torch.zeros(0, dtype=torch.long, device=device)

    def seed(self, purpose: str = "") -> int:
        return 0

    def rng(self, purpose: str = "", device=None) -> torch.Generator:
        return torch.Generator(device=device or "cpu").manual_seed(0)

    def log(self, **values: Any) -> None:
        pass

    def _outside(self, *args, **kwargs):
        raise CilbenchError("bench times one task's training and inference steps; this method needs a whole run "
                            "(cilbench run ... --quick)")

    features = fit = reference = _outside


def _build(cls, cfg, backbone_name: str, preset: str, device: torch.device):
    """The method as a run's first task has it before ``before_fit`` (bench's one task of ``BENCH_CLASSES``
    classes, a random backbone), its task and its device transform."""
    torch.manual_seed(0)
    scenario = build_scenario("synthetic")
    task = scenario.tasks[0]
    task = Task(0, "bench", task.dataset, tuple(range(BENCH_CLASSES)), tuple(range(BENCH_CLASSES)),
                tuple(f"class {i}" for i in range(BENCH_CLASSES)))
    scenario.tasks = [task]
    backbone = build_backbone(backbone_name, pretrained=False)
    method = cls(cfg, backbone, scenario).to(device)
    method.before_task(task)
    method.to(device)
    return method, task, PRESETS[preset].with_size(backbone.input_size)


def _fit(method, task, cfg, data: TaskData, device: torch.device, fused: bool = False
         ) -> torch.optim.Optimizer | None:
    """``before_fit`` on ``data`` (the state a run's first task trains with: teachers, proxies, class weights) and
    the optimiser of the method's parameter groups (``fused``: as the trainer builds it for its device-side NaN
    guard); None for a method that does not train."""
    method.eval()
    method.before_fit(task, _BenchContext(task, data, device))
    groups = method.param_groups(task)
    return build_optimizer(groups, cfg, fused=fused) if groups else None


def _train_fn(method, optimizer, task, device: torch.device, low_precision: bool = True, deferred: bool = False):
    """``step(images, labels)``: one optimiser step through the trainer's ``train_step`` on transformed images
    (``deferred``: the trainer's CUDA path, no host sync; a non-finite loss is then skipped on the device)."""
    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        if train_step(method.training_step, optimizer, Batch(images, labels, task), device,
                      low_precision=low_precision, deferred=deferred)[0] is None:
            raise CilbenchError(f"bench: the {type(method).name} loss is not finite on random data")
    return step


def _infer_fn(method, classes: torch.Tensor, device: torch.device, low_precision: bool = True):
    """``step(images)``: the logits over ``classes`` without gradients, under autocast with ``low_precision``."""
    @torch.no_grad()
    def step(images: torch.Tensor) -> None:
        with autocast(device) if low_precision else contextlib.nullcontext():
            method.logits(images, classes)
    return step


def _bench_mode(cls, cfg, backbone_name: str, preset: str, bs: int, device: torch.device, steps: int, warmup: int,
                mode: str, progress) -> ModeResult:
    method, task, transform = _build(cls, cfg, backbone_name, preset, device)
    size = transform.size
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (bs, size, size, 3), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, BENCH_CLASSES, (bs,), generator=gen).to(device)
    classes = torch.arange(BENCH_CLASSES, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    deferred = deferred_guard(device)
    optimizer = _fit(method, task, cfg, TaskData(raw.cpu().numpy(), np.arange(bs), labels.cpu().numpy()), device,
                     fused=deferred)
    train_s = train_flops = None
    update = progress(f"bench {mode}", 2 * (steps + warmup)) if progress else (lambda n, v: None)
    if optimizer is not None:
        method.train()
        train = _train_fn(method, optimizer, task, device, deferred=deferred)
        train_s, train_flops = _time(lambda: train(transform(raw, train=True), labels), warmup, steps, device, update)
    method.eval()
    infer = _infer_fn(method, classes, device)
    infer_s, infer_flops = _time(lambda: infer(transform(raw, train=False)), warmup, steps, device, update,
                                 inference_of=method)
    peak = _peak_mb(device)
    return ModeResult(
        mode=mode,
        train_images_per_s=round(bs / train_s, 2) if train_s else None,
        infer_images_per_s=round(bs / infer_s, 2),
        train_step_ms=round(1e3 * train_s, 3) if train_s else None,
        infer_step_ms=round(1e3 * infer_s, 3),
        train_gflop_per_image=round(train_flops / bs / 1e9, 4) if train_flops else None,
        infer_gflop_per_image=round(infer_flops / bs / 1e9, 4),
        train_tflops=round(train_flops / train_s / 1e12, 4) if train_s else None,
        infer_tflops=round(infer_flops / infer_s / 1e12, 4),
        peak_memory_mb=round(peak, 1),
    )


# --- --compare-naive: the same steps end to end, fed by our store loader or by a per-item JPEG + PIL pipeline ---

JPEG_QUALITY = 95


def synthetic_store(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 [size, size, 3] images of smooth random colour blobs plus mild noise (so their JPEGs have a
    realistic size, unlike pure noise) and labels in ``range(BENCH_CLASSES)``."""
    gen = torch.Generator().manual_seed(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(0, n, 64):  # in chunks: float copies of thousands of 256 px images would take gigabytes
        k = min(64, n - i)
        blobs = torch.nn.functional.interpolate(255 * torch.rand(k, 3, 6, 6, generator=gen), size=(size, size),
                                                mode="bicubic", align_corners=False)
        noisy = blobs + 8 * torch.randn(k, 3, size, size, generator=gen)
        images[i:i + k] = noisy.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, torch.randint(0, BENCH_CLASSES, (n,), generator=gen).numpy()


def naive_transforms(t: ImageTransform):
    """torchvision PIL transforms equivalent to ``t`` as the references write them: train RandomResizedCrop (or
    RandomCrop with padding) + flip (+ ColorJitter / RandAugment when ``t`` has them), test Resize + CenterCrop;
    then ToTensor (+ Normalize when ``t`` has a mean / std)."""
    from torchvision import transforms as T

    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    train = [T.RandomCrop(t.size, padding=t.pad) if t.pad else
             T.RandomResizedCrop(t.size, scale=t.scale, ratio=t.ratio, interpolation=modes[t.interpolation])]
    train += [T.RandomHorizontalFlip()] if t.flip else []
    if t.rand_augment is not None:  # torchvision's RandAugment: timm's op set differs, its cost is alike
        spec = parse_rand_augment(t.rand_augment)
        train.append(T.RandAugment(spec.num_layers, round(spec.magnitude), interpolation=modes[t.aug_interpolation]))
    train += [T.ColorJitter(*t.jitter)] if t.jitter is not None else []
    test = [T.Resize(t.eval_resize, interpolation=modes[t.eval_interpolation]), T.CenterCrop(t.size)]
    tail = [T.ToTensor()] + ([T.Normalize(t.mean, t.std)] if t.mean is not None and t.std is not None else [])
    return T.Compose(train + tail), T.Compose(test + tail)


class JpegDataset(torch.utils.data.Dataset):
    """LAMDA-PILOT's per-item loading: each item's JPEG is decoded with PIL and transformed by PIL transforms."""

    def __init__(self, jpegs: list[bytes], labels: np.ndarray, transform):
        self.jpegs, self.labels, self.transform = jpegs, labels, transform

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(io.BytesIO(self.jpegs[i])) as img:
            return self.transform(img.convert("RGB")), int(self.labels[i])


def _epochs(make: Callable[[], Iterable]) -> Iterator:
    """The batches of ``make()``'s iterator, then of a new one (the next epoch) whenever it runs out."""
    while True:
        yield from make()


def _run(batches: Iterator, step: Callable[[Any], None], n: int, device: torch.device, update) -> tuple[float, float]:
    """Seconds for ``n`` steps on ``n`` batches of ``batches`` (waiting for them included) and the seconds of that
    spent blocked on the next batch."""
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        t1 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t1
        step(batch)
        update(1, 0.0)
    _sync(device)
    return time.perf_counter() - t0, wait


def _pipeline(name: str, cls, cfg, backbone_name: str, preset: str, store: TaskData, jpegs: list[bytes] | None,
              bs: int, device: torch.device, steps: int, warmup: int, workers: int, progress) -> dict[str, Any]:
    """One pipeline's training (when the method trains) and inference, each timed over ``steps`` batches after
    ``warmup`` untimed ones, from the loader's first batch to the device's last kernel. Each timed block creates its
    loader iterator inside the timing (its start-up, worker processes included, counted once, as an epoch counts
    it). ``jpegs`` None: ours (``BatchStream`` of the uint8 store, the device transform inside the step, bf16
    autocast on CUDA); else naive (``JpegDataset`` in a ``DataLoader`` of ``workers`` processes, float32)."""
    method, task, transform = _build(cls, cfg, backbone_name, preset, device)
    ours = jpegs is None
    deferred = ours and deferred_guard(device)  # the trainer's path on CUDA; the naive one syncs every step
    optimizer = _fit(method, task, cfg, store, device, fused=deferred)
    classes = torch.arange(BENCH_CLASSES, device=device)
    if ours:
        def loader(train: bool) -> Iterator:
            stream = BatchStream(store, bs, device, shuffle=True, drop_last=True)
            return _epochs(lambda: ((b.images, b.labels) for b in stream))
    else:
        pil_train, pil_test = naive_transforms(transform)

        def loader(train: bool) -> Iterator:
            data = JpegDataset(jpegs, store.labels, pil_train if train else pil_test)
            dl = torch.utils.data.DataLoader(data, bs, shuffle=True, num_workers=workers, drop_last=True,
                                             pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(0))
            return _epochs(lambda: ((x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                                    for x, y in dl))
    blocks = [("infer", False, _infer_fn(method, classes, device, low_precision=ours))]
    if optimizer is not None:
        blocks.insert(0, ("train", True, _train_fn(method, optimizer, task, device, low_precision=ours,
                                                   deferred=deferred)))
    update = progress(f"bench {name} pipeline", len(blocks) * (steps + warmup)) if progress else (lambda n, v: None)
    out: dict[str, Any] = {"train_images_per_s": None, "infer_images_per_s": None, "train_data_wait": None,
                           "infer_data_wait": None, "train_gflop_per_image": None, "train_tflops": None}
    for what, train, fn in blocks:
        method.train(train)

        def prep(x: torch.Tensor) -> torch.Tensor:
            return transform(x, train=train) if ours else x

        def step(batch) -> None:
            images = prep(batch[0])
            fn(images, batch[1]) if train else fn(images)

        for timed, n in ((False, warmup), (True, steps)):
            batches = loader(train)
            total, wait = _run(batches, step, n, device, update)
            if timed:
                out[f"{what}_images_per_s"] = round(bs * steps / total, 2)
                out[f"{what}_data_wait"] = round(wait / total, 4)
            if timed and train:  # the model's FLOPs on one more (transformed) batch, alike in both pipelines
                x, y = next(batches)
                x = prep(x)
                flops = count_flops(lambda: fn(x, y))
                out["train_gflop_per_image"] = round(flops / bs / 1e9, 4)
                out["train_tflops"] = round(flops * steps / total / 1e12, 4)
            batches.close()  # stops the prefetch thread or the worker processes before the next block
    out["precision"] = "bf16" if ours and device.type == "cuda" else "float32"
    if hasattr(cfg, "batched_experts"):
        out["batched_experts"] = cfg.batched_experts
    return out


def compare_naive(cls, cfg, backbone_name: str, preset: str, bs: int, device: torch.device, steps: int,
                  warmup: int, workers: int | None, progress) -> dict[str, Any]:
    """Ours against the naive pipeline on the same ``bs * max(4, steps)`` synthetic images (stored at the
    transform's eval resize R, the store's square size: 256 for 224 px PILOT inputs), so one timed block is at
    most one epoch. Ratios are ours / naive images/s of the rounded numbers."""
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    from PIL import Image

    transform = PRESETS[preset].with_size(BACKBONES.get(backbone_name).input_size)
    size = transform.eval_resize  # the store's square: R of the eval Resize(R) (the input size itself for CIFAR)
    images, labels = synthetic_store(bs * max(4, steps), size)
    store = TaskData(images, np.arange(len(images)), labels)
    jpegs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
        jpegs.append(buf.getvalue())
    batched = {"batched_experts": True} if hasattr(cfg, "batched_experts") else {}
    sequential = {"batched_experts": False} if batched else {}
    common = (backbone_name, preset, store)
    ours = _pipeline("ours", cls, dataclasses.replace(cfg, **batched), *common, None, bs, device, steps, warmup,
                     workers, progress)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    naive = _pipeline("naive", cls, dataclasses.replace(cfg, **sequential), *common, jpegs, bs, device, steps,
                      warmup, workers, progress)

    def ratio(key: str) -> float | None:
        return round(ours[key] / naive[key], 3) if ours[key] and naive[key] else None

    return {"ours": ours, "naive": naive,
            "ratio": {"train": ratio("train_images_per_s"), "inference": ratio("infer_images_per_s")},
            "steps": steps, "warmup": warmup, "images": len(images), "image_size": size,
            "jpeg_quality": JPEG_QUALITY, "jpeg_kb_mean": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
            "workers": workers}
