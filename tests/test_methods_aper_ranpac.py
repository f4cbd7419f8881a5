"""finetune-adapter, aper-adapter and ranpac: the equations on tiny problems, freezing after the first task, the CLI
end to end and resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cilbench.data.scenario import Scenario, Task
from cilbench.methods.aper import AperAdapter
from cilbench.methods.finetune_adapter import FinetuneAdapter
from cilbench.methods.ranpac import RanPAC, ridge_solve, select_ridge
from cilbench.models.backbones import build_backbone


class FakeContext:
    """What ``after_task`` uses of a TaskContext: features of fixed images (no transform), seeds, the log."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 3):
        self.images, self.labels, self.task_seed, self.device = images, labels, seed, torch.device("cpu")
        self.logged: dict = {}

    @torch.no_grad()
    def features(self, encode):
        return encode(self.images).float(), self.labels

    def seed(self, purpose: str = "") -> int:
        from cilbench.engine.runner import LEGACY_SUB_SEEDS

        return self.task_seed + LEGACY_SUB_SEEDS[purpose]

    def rng(self, purpose: str = "", device=None) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed(purpose))

    def log(self, **values) -> None:
        self.logged.update(values)


def _scenario() -> Scenario:
    tasks = [Task(0, "task 0", "toy", (0, 1), (0, 1)), Task(1, "task 1", "toy", (2, 3), (2, 3))]
    return Scenario("cil", "toy", "B0Inc2", 4, tasks)


def _images(classes: tuple[int, ...], per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    images = torch.rand(len(labels), 3, 32, 32, generator=g) + 0.3 * labels.view(-1, 1, 1, 1)
    return images, labels


def _tuned(method) -> None:
    """Stand-in for a tuned adapter: random non-zero weights, so adapted and plain features differ."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in method.vit.expert_parameters(0):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


# ---- APER ----

def test_aper_prototypes_are_class_means_of_plain_and_adapted_features():
    torch.manual_seed(0)
    backbone = build_backbone("vit-tiny")
    reference = copy.deepcopy(backbone).eval()  # the untouched pre-trained model, computed independently
    scenario = _scenario()
    method = AperAdapter(AperAdapter.Config(), backbone, scenario).eval()
    _tuned(method)
    images, labels = _images((0, 1), 5, seed=1)
    task = scenario.tasks[0]
    method.before_task(task)
    method.after_task(task, FakeContext(images, labels))

    with torch.no_grad():
        plain = reference(images)
        adapted = method.vit(images, experts=[0])[0]
    assert (plain - adapted).abs().max() > 1e-2  # the adapter matters, so the order of the halves is tested
    z = torch.cat([plain, adapted], dim=1).double()
    expected = torch.stack([z[labels == c].mean(0) for c in (0, 1)]).float()
    d = backbone.feature_dim
    assert method.prototypes.prototypes.shape == (2, 2 * d)  # task 0's two classes, [plain || adapted]
    torch.testing.assert_close(method.prototypes.prototypes, expected, rtol=1e-5, atol=1e-5)
    # inference: cosine between [plain || adapted] and the prototypes
    with torch.no_grad():
        logits = method.logits(images, torch.tensor([0, 1]))
    torch.testing.assert_close(logits, F.normalize(z.float(), dim=1) @ F.normalize(expected, dim=1).T,
                               rtol=1e-5, atol=1e-5)
    # the first task froze the adapter and the tuning head; the next task trains nothing
    assert not any(p.requires_grad for p in method.vit.expert_parameters(0))
    assert method.param_groups(scenario.tasks[1]) == []


# ---- RanPAC: the ridge head ----

def test_ridge_solve_is_the_closed_form():
    rng = np.random.default_rng(0)
    H = np.maximum(rng.normal(size=(40, 6)), 0)
    Y = np.eye(3)[rng.integers(0, 3, 40)]
    G, Q = H.T @ H, H.T @ Y
    for lam in (1e-3, 0.5, 10.0):
        expected = np.linalg.inv(G + lam * np.eye(6)) @ Q
        got = ridge_solve(torch.tensor(G), torch.tensor(Q), lam)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_ranpac_head_accumulates_over_tasks_and_scores_h_times_wo():
    torch.manual_seed(0)
    backbone = build_backbone("vit-tiny")
    scenario = _scenario()
    cfg = RanPAC.Config(M=12, ridge_min_exp=0, ridge_max_exp=0)  # lambda = 1: only the solve is under test
    method = RanPAC(cfg, backbone, scenario).eval()
    _tuned(method)
    data = [_images((0, 1), 10, seed=1), _images((2, 3), 10, seed=2)]
    lams = []
    for task, (images, labels) in zip(scenario.tasks, data):
        method.before_task(task)
        ctx = FakeContext(images, labels, seed=5 + task.index)
        method.after_task(task, ctx)
        lams.append(ctx.logged["ridge_lambda"])

    W = method.ridge.W.double()
    assert W.shape == (backbone.feature_dim, 12)
    with torch.no_grad():
        X = torch.cat([method.vit(im, experts=[0])[0] for im, _ in data]).double()
    y = torch.cat([lab for _, lab in data])
    H = torch.relu(X @ W).numpy()
    Y = np.eye(4)[y.numpy()]
    G, Q = H.T @ H, H.T @ Y  # accumulated over both tasks
    expected = np.linalg.inv(G + 1.0 * np.eye(12)) @ Q  # (G + lambda I)^-1 Q, [M, C]
    assert lams == [1.0, 1.0]
    np.testing.assert_allclose(method.ridge.Wo.T.double().numpy(), expected, rtol=1e-3, atol=2e-4)  # float32 features
    # inference is linear: s = ReLU(x W) W_o, on the candidate classes in the order asked
    images = data[1][0][:4]
    classes = torch.tensor([3, 0, 2])
    with torch.no_grad():
        x = method.vit(images, experts=[0])[0].double()
        scores = method.logits(images, classes).double()
    np.testing.assert_allclose(scores.numpy(), (torch.relu(x @ W).numpy() @ expected)[:, [3, 0, 2]],
                               rtol=1e-3, atol=1e-4)
    # the random projection was drawn once, at the first task, from the first task's seed
    assert torch.equal(method.ridge.W, torch.randn(backbone.feature_dim, 12, generator=torch.Generator().manual_seed(5)))


def _held_out(n: int, seed: int, fraction: float = 0.2):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_fit = int(n * (1 - fraction))
    return perm[:n_fit], perm[n_fit:]


def _scores(H, Y, lambdas, seed):
    fit, val = _held_out(len(H), seed)
    G, Q = H[fit].T @ H[fit], H[fit].T @ Y[fit]
    mse, acc = [], []
    for lam in lambdas:
        pred = H[val] @ np.linalg.solve(G + lam * np.eye(len(G)), Q)
        mse.append(np.mean((pred - Y[val]) ** 2))
        acc.append(np.mean(pred.argmax(1) == Y[val].argmax(1)))
    return np.array(mse), np.array(acc)


def test_lambda_selection_picks_the_best_held_out_grid_value():
    # two classes sharing a large common component, class 0 twice as frequent: a heavily regularised head
    # (W_o ~ Q / lambda, a count-weighted class-sum classifier) calls every class-1 image class 0; a light
    # ridge separates them on the second coordinate
    rng = np.random.default_rng(0)
    n0, n1 = 40, 20
    H = np.concatenate([np.tile([10.0, 1.0], (n0, 1)), np.tile([10.0, -1.0], (n1, 1))]) + 0.05 * rng.normal(size=(60, 2))
    Y = np.eye(2)[[0] * n0 + [1] * n1]
    lambdas = [1e8, 1e-3, 1e4]  # the best is not the first
    mse, acc = _scores(H, Y, lambdas, seed=4)
    assert acc[1] == 1.0 and acc[0] < 1.0  # the case discriminates
    for criterion in ("accuracy", "mse"):
        lam, mses = select_ridge(torch.tensor(H), torch.tensor(Y), lambdas, 0.2, criterion,
                                 torch.Generator().manual_seed(4))
        assert lam == 1e-3
        np.testing.assert_allclose(mses, mse, rtol=1e-8)

    # on random data, each criterion picks its own held-out optimum over the official grid
    H = np.maximum(rng.normal(size=(50, 8)) + np.eye(5)[rng.integers(0, 5, 50)] @ rng.normal(size=(5, 8)), 0)
    Y = np.eye(5)[rng.integers(0, 5, 50)]
    grid = [10.0 ** e for e in range(-8, 9)]
    mse, acc = _scores(H, Y, grid, seed=9)
    lam, _ = select_ridge(torch.tensor(H), torch.tensor(Y), grid, 0.2, "mse", torch.Generator().manual_seed(9))
    assert lam == grid[int(np.argmin(mse))]
    lam, _ = select_ridge(torch.tensor(H), torch.tensor(Y), grid, 0.2, "accuracy", torch.Generator().manual_seed(9))
    best = [i for i in range(len(grid)) if acc[i] == acc.max()]
    assert lam == grid[min(best, key=lambda i: mse[i])]


def test_bad_ranpac_settings_fail_clearly(cli, tmp_path):
    r = cli("run", "ranpac", "--dataset", "synthetic", "--quick", "--out", tmp_path, "--set", "ridge_select=r2")
    assert r.code != 0 and "ridge_select" in r.err and "Traceback" not in r.err


# ---- end to end ----

@pytest.mark.parametrize("name,cls", [("finetune-adapter", FinetuneAdapter), ("aper-adapter", AperAdapter),
                                      ("ranpac", RanPAC)])
def test_run_on_synthetic_and_adapter_tuning_schedule(cli, tmp_path, monkeypatch, name, cls):
    snapshots: list[list[torch.Tensor]] = []
    original = cls.after_task

    def spy(self, task, ctx):
        original(self, task, ctx)
        snapshots.append([p.detach().cpu().clone() for p in self.vit.expert_parameters(0)])

    monkeypatch.setattr(cls, "after_task", spy)
    out = tmp_path / "res"
    r = cli("run", name, "--dataset", "synthetic", "--quick", "--set", "epochs=3", "--out", out)
    assert r.code == 0, r.err + r.out
    files = list(out.glob("*.json"))
    assert len(files) == 1
    rec = json.loads(files[0].read_text())
    assert rec["method"] == name and rec["status"] == "complete" and rec["increments"] == [5, 5, 5, 5]
    m = np.array([[np.nan if v is None else v for v in row] for row in rec["accuracy_matrix"]])
    assert m.shape == (4, 4) and not np.isnan(m[np.tril_indices(4)]).any()

    assert len(snapshots) == 4
    ups = [p for i, p in enumerate(snapshots[0]) if i % 4 == 2]  # per block: down.w, down.b, up.w, up.b
    assert any(p.abs().sum() > 0 for p in ups)  # the zero-initialised up-projections were tuned on task 1
    later_equal = [all(torch.equal(a, b) for a, b in zip(snapshots[0], s)) for s in snapshots[1:]]
    if name == "finetune-adapter":
        assert not any(later_equal)  # tuned again on every task
    else:
        assert all(later_equal)  # frozen after the first task
    if name == "ranpac":
        assert rec["config"]["M"] == 256  # the quick profile's projection width
        lams = [t["ridge_lambda"] for t in rec["log"]]
        assert len(lams) == 4 and all(lam in [10.0 ** e for e in range(-8, 9)] for lam in lams)
    if name == "aper-adapter":
        assert rec["metrics"]["A_last"] > 30  # prototypes on real class structure beat chance (5%) by far


# ---- resume ----

RESUME_ARGS = ["run", "ranpac", "--dataset", "synthetic", "--quick", "--seed", "7", "--set", "epochs=1"]


def _cli(out: Path, *extra: str, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kill_after is not None:
        env["CILBENCH_TEST_KILL_AFTER_TASK"] = str(kill_after)
    return subprocess.run([sys.executable, "-m", "cilbench", *RESUME_ARGS, "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=300)


def test_ranpac_resume_after_sigkill_gives_identical_numbers(tmp_path):
    full = _cli(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    killed = _cli(tmp_path / "resumed", kill_after=1)
    assert killed.returncode == -9
    # the checkpoint's tensor file holds the method's state (engine/checkpoint.py)
    tensors = torch.load(next((tmp_path / "resumed" / ".checkpoints").glob("*.pt")), weights_only=True)
    keys = list(tensors)
    assert all(not k.startswith("backbone.") or ".adapters." in k for k in keys)  # no frozen ViT weights
    assert any(".adapters." in k for k in keys) and tensors["ridge.G"].shape == (256, 256)
    resumed = _cli(tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after task 2" in resumed.stdout
    a = json.loads(next((tmp_path / "full").glob("*.json")).read_text())
    b = json.loads(next((tmp_path / "resumed").glob("*.json")).read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert [t["ridge_lambda"] for t in a["log"]] == [t["ridge_lambda"] for t in b["log"]]
