"""``cilbench bench``: throughput of a method's training and inference steps on synthetic data.

The method is built exactly as ``cilbench run`` builds it (same config resolution, same transform on the device,
the trainer's ``train_step``), on a randomly initialised backbone of the asked-for shape, and timed after warm-up.
Reported per mode: images/s for training and inference, peak memory (CUDA: allocator peak; CPU: the process's
peak resident set) and FLOPs per image counted by ``torch.utils.flop_counter``; on CUDA also the achieved TFLOP/s
against the device's own bf16 matmul rate measured on the spot. Methods with a ``batched_experts`` setting
(CICAE) are timed both ways in one run and the ratio is reported.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cilbench.data.augment import PRESETS
from cilbench.data.scenario import Task, build_scenario
from cilbench.engine.evaluator import count_flops
from cilbench.engine.loader import TaskData
from cilbench.engine.trainer import autocast, build_optimizer, train_step
from cilbench.errors import CilbenchError
from cilbench.methods.contract import Batch
from cilbench.models.backbones import build_backbone
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
          progress=None) -> dict[str, Any]:
    for flag, value, low in (("--batch-size", batch_size, 1), ("--steps", steps, 1), ("--warmup", warmup, 0)):
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
    steps = steps or (20 if device.type == "cuda" else 5)
    modes = [("batched", True), ("sequential", False)] if hasattr(cfg, "batched_experts") else [("default", None)]
    results = []
    for mode, batched in modes:
        mcfg = dataclasses.replace(cfg, batched_experts=batched) if batched is not None else cfg
        results.append(_bench_mode(cls, mcfg, name, plan.transform_preset, bs, device, steps, warmup, mode,
                                   progress))
        if device.type == "cuda":
            torch.cuda.empty_cache()
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


def _bench_mode(cls, cfg, backbone_name: str, preset: str, bs: int, device: torch.device, steps: int, warmup: int,
                mode: str, progress) -> ModeResult:
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
    size = backbone.input_size
    transform = PRESETS[preset].with_size(size)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (bs, size, size, 3), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, BENCH_CLASSES, (bs,), generator=gen).to(device)
    classes = torch.arange(BENCH_CLASSES, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ctx = _BenchContext(task, TaskData(raw.cpu().numpy(), np.arange(bs), labels.cpu().numpy()), device)
    method.eval()
    method.before_fit(task, ctx)  # the state a run's first task trains with (teachers, proxies, class weights)
    groups = method.param_groups(task)
    train_s = train_flops = None
    update = progress(f"bench {mode}", 2 * (steps + warmup)) if progress else (lambda n, v: None)
    if groups:
        optimizer = build_optimizer(groups, cfg)
        method.train()

        def one_train():
            if train_step(method.training_step, optimizer, Batch(transform(raw, train=True), labels, task),
                          device)[0] is None:
                raise CilbenchError(f"bench: the {cls.name} loss is not finite on random data")

        train_s, train_flops = _time(one_train, warmup, steps, device, update)
    method.eval()

    @torch.no_grad()
    def one_infer():
        with autocast(device):
            method.logits(transform(raw, train=False), classes)

    infer_s, infer_flops = _time(one_infer, warmup, steps, device, update, inference_of=method)
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
