"""MoE-Adapters as a method (PROTOCOLS-2 §2): activate-freeze, routers per task, DDAS routing and its oracle view,
the per-dataset learning rates, the CIL presets, few-shot sampling, and the Table 5 parameter counts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from cilbench.methods.moe_adapters import MoEAdapters, freeze_mask, parameter_report
from cilbench.plan import RunOptions, RunPlan
from tests._one_line import cli_error


def _method(dataset="synthetic-mtil", quick=True, **sets):
    from cilbench.models.backbones import build_backbone

    plan = RunPlan.build(RunOptions("moe-adapters", dataset, quick=quick, sets={k: str(v) for k, v in sets.items()}))
    torch.manual_seed(0)
    backbone = build_backbone(plan.backbone, pretrained=False)
    return MoEAdapters(plan.cfg, backbone, plan.scenario)


class _Ctx:
    def __init__(self):
        self.logged = {}

    def rng(self, purpose="", device=None):
        return torch.Generator().manual_seed(1)

    def log(self, **values):
        self.logged.update(values)


def test_freeze_rule_takes_the_most_chosen_experts_per_block_ties_to_the_lower_index():
    counts = torch.tensor([[5, 9, 9, 0], [0, 0, 0, 0], [1, 7, 2, 7]])
    assert freeze_mask(counts, 2).tolist() == [[False, True, True, False], [True, True, False, False],
                                               [False, True, False, True]]


def test_frozen_experts_accumulate_over_tasks_and_stop_training(monkeypatch):
    m = _method(ddas="false")
    tasks = m.scenario.tasks
    ctx = _Ctx()
    m.before_fit(tasks[0], ctx)
    assert all(p.requires_grad for b in m.blocks for p in b.experts.parameters())
    for b, block in enumerate(m.blocks):  # this task's choices, per block (image and text blocks counted apart)
        block.counts.copy_(torch.arange(len(block.experts)) if b % 2 == 0 else torch.arange(len(block.experts)).flip(0))
    m.after_task(tasks[0], ctx)
    e = m.cfg.num_experts
    first = m.frozen.clone()
    assert first[0].nonzero().flatten().tolist() == [e - 2, e - 1] and first[1].nonzero().flatten().tolist() == [0, 1]
    assert ctx.logged["frozen_experts"] == 2 * len(m.blocks)
    m.before_fit(tasks[1], ctx)  # counts restart at zero; frozen experts leave the optimiser
    assert all(int(b.counts.sum()) == 0 for b in m.blocks)
    for b, block in enumerate(m.blocks):
        for k, expert in enumerate(block.experts):
            assert all(p.requires_grad != bool(first[b, k]) for p in expert.parameters())
    trainable = {id(p) for g in m.param_groups(tasks[1]) for p in g["params"] if p.requires_grad}
    assert id(m.blocks[0].experts[e - 1].up.weight) not in trainable and id(m.blocks[0].routers[1]) in trainable
    for block in m.blocks:  # the next task favours other experts: the frozen set grows (cumulative)
        block.counts.copy_(torch.tensor([0] * (e - 4) + [5, 6, 0, 0]))
    m.after_task(tasks[1], ctx)
    assert bool((m.frozen & first).eq(first).all()) and int(m.frozen[0].sum()) == 4


def test_each_task_trains_its_own_router_and_evaluation_uses_the_oracle_without_ddas():
    m = _method(ddas="false")
    ctx = _Ctx()
    t0, t1 = m.scenario.tasks[:2]
    m.before_fit(t0, ctx)
    assert {b.router for b in m.blocks} == {0}
    m.after_task(t0, ctx)
    m.before_fit(t1, ctx)
    assert {b.router for b in m.blocks} == {1}
    m.after_task(t1, ctx)
    assert m.oracle_router(torch.tensor(t0.classes)) == 0 and m.oracle_router(torch.tensor(t1.classes)) == 1
    later = m.scenario.tasks[3]
    assert m.oracle_router(torch.tensor(later.classes)) is None  # not trained yet: the original CLIP


def test_ddas_routes_each_batch_to_the_chosen_task_router_or_the_original_clip(monkeypatch):
    m = _method()
    m.eval()
    m.tasks_done.fill_(2)
    classes = torch.tensor(m.scenario.tasks[1].classes)
    images = torch.randn(4, 3, 32, 32)
    used = []
    real = MoEAdapters._scores

    def spy(self, imgs, cls, router):
        used.append((router, len(imgs)))
        return real(self, imgs, cls, router)

    monkeypatch.setattr(MoEAdapters, "_scores", spy)
    monkeypatch.setattr(m.ddas, "select", lambda imgs: torch.tensor([0, 0, -1, 0]))
    scores, views = m.score_views(images, classes)
    assert used == [(None, 1), (0, 3), (1, 4)]  # DDAS's groups (CLIP, task 0), then the oracle view (task 1)
    assert scores.shape == (4, len(classes)) and set(views) == {"oracle"}
    # the oracle's router in both encoders: its text classifier is cached under that router
    assert any(key == 1 for (_, key) in m.text_eval._cache)


def test_mtil_learning_rates_follow_the_official_table_by_dataset():
    from cilbench.methods.clip_base import MOE_FEWSHOT_LR, MOE_MTIL_LR

    plan = RunPlan.build(RunOptions("moe-adapters", "mtil", order="II"))
    lrs = [MOE_MTIL_LR[t.dataset] for t in plan.scenario.tasks]
    assert plan.scenario.tasks[0].dataset == "cars" and lrs[0] == 1e-3 and lrs[6] == 5e-3  # aircraft, 7th in II
    assert MOE_MTIL_LR["eurosat"] == 1e-4 and MOE_FEWSHOT_LR["food"] == 1e-2
    few = RunPlan.build(RunOptions("moe-adapters", "mtil-fewshot"))
    assert few.cfg.iterations == 500 and few.cfg.ddas_threshold == 0.06 and few.cfg.ddas_lr == 0.003
    assert few.scenario.shots == 5 and few.scenario.name == "order-I"


def test_cil_presets_are_the_official_cil_configuration():
    for dataset, batch in (("cifar100", 128), ("tinyimagenet", 64)):
        cfg = RunPlan.build(RunOptions("moe-adapters", dataset, scenario="B0Inc10" if dataset == "cifar100"
                                       else "B100Inc10", class_order=None)).cfg
        assert (cfg.num_experts, cfg.routers, cfg.freeze_experts, cfg.ddas) == (2, "shared", 0, False)
        assert (cfg.iterations, cfg.epochs, cfg.warmup_iterations, cfg.label_smoothing, cfg.lr) == \
            (None, 1, 30, 0.0, 1e-3)
        assert cfg.batch_size == batch and cfg.noise == "train" and cfg.eval_crop == "center"
    assert _method("synthetic").freeze == 0 and _method().freeze == 2  # auto: per-task routers freeze 2


def test_official_cil_evaluation_crop_is_a_setting_with_its_own_seeded_crops():
    plan = RunPlan.build(RunOptions("moe-adapters", "synthetic", quick=True, sets={"eval_crop": "train"}))
    from cilbench.models.backbones import build_backbone

    m = MoEAdapters(plan.cfg, build_backbone(plan.backbone, pretrained=False), plan.scenario)
    assert m.eval_augment and not _method("synthetic").eval_augment


def test_noise_setting_reaches_every_block():
    assert {b.noise_mode for b in _method(noise="always").blocks} == {True}
    assert {b.noise_mode for b in _method(noise="off").blocks} == {False}
    assert {b.noise_mode for b in _method(noise="train").blocks} == {"train"}


def test_lr_alone_on_mtil_is_refused_not_ignored(cli):
    err = cli_error(cli("run", "moe-adapters", "--dataset", "mtil", "--set", "lr=0.01", "--device", "cpu"))
    assert "lr_table=none" in err


def test_table5_parameter_counts_at_the_real_shape():
    """Slide Table 5: 51.1M for the experts and routers, 8.7M for one DDAS autoencoder (PROTOCOLS-2 §2.1)."""
    cfg = RunPlan.build(RunOptions("moe-adapters", "mtil")).cfg
    assert parameter_report(cfg, "clip-vit-b16") == {"experts_and_routers": 51_059_712,
                                                    "ddas_autoencoder": 8_696_164}


def test_shots_draw_a_fixed_few_images_per_class_and_name_the_scenario(tmp_path, cli):
    assert cli("run", "moe-adapters", "--dataset", "synthetic-mtil", "--quick", "--shots", "3", "--set",
               "iterations=2", "--set", "ddas_reference_iterations=1", "--set", "ddas_task_iterations=1",
               "--out", str(tmp_path), "--device", "cpu").code == 0
    path, = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["scenario"] == "order-I-3shot" and "order-I-3shot" in path.name
    from cilbench.data.scenario import build_scenario

    assert build_scenario("synthetic-mtil", shots=3).shots == 3 and build_scenario("mtil-fewshot").shots == 5
    assert "shots" in cli_error(cli("run", "moe-adapters", "--dataset", "synthetic-mtil", "--quick", "--shots", "0"))


def test_shots_subset_has_that_many_images_per_class(shared_cache):
    from cilbench.data.scenario import build_scenario
    from cilbench.engine.runner import ScenarioData

    scenario = build_scenario("synthetic-mtil", shots=4)
    data = ScenarioData(scenario, shared_cache, quick=False, seed=3)
    again = ScenarioData(build_scenario("synthetic-mtil", shots=4), shared_cache, quick=False, seed=3)
    for train, other, test in zip(data.train, again.train, data.test):
        _, counts = np.unique(train.labels, return_counts=True)
        assert set(counts.tolist()) == {4} and np.array_equal(train.indices, other.indices)
        assert len(test) > 4 * len(counts)  # the test split is whole


def test_paper_tables_show_every_method_row_of_ours_beside_the_paper(cli, tmp_path):
    """Every row of MoE-Adapters Table 1 that names a method finds its quick runs (the suite's rows, their `sets`
    and config keys, the per-dataset cells of each block). The eleven MTIL stores cannot be prepared offline, so the
    records are one real quick record on the synthetic sequence, re-labelled to each row's MTIL run (its plan's
    file name, config key and config) with an 11 x 11 matrix."""
    from cilbench import metrics
    from cilbench.suites import load_suite

    seed_run = tmp_path / "seed"
    assert cli("run", "zeroshot-clip", "--dataset", "synthetic-mtil", "--quick", "--out", str(seed_run),
               "--device", "cpu").code == 0
    template = json.loads(next(seed_run.glob("*.json")).read_text())
    suite = load_suite("moe-adapters-table1")
    out = tmp_path / "results"
    out.mkdir()
    names = [c.key for c in suite.columns if c.key]
    for k, row in enumerate(r for r in suite.rows if r.method):
        plan = RunPlan.build(RunOptions(row.method, "mtil", quick=True, seed=1993,
                                        sets={a: str(v).lower() if isinstance(v, bool) else str(v)
                                              for a, v in row.sets.items()}), hash_weights=False)
        matrix = [[10.0 + k + i + j / 10 for j in range(11)] for i in range(11)]
        record = dict(template, method=row.method, dataset="mtil", scenario="order-I", task_names=names,
                      run_id=plan.record_name.removesuffix(".json"), config_key=plan.config_key,
                      config_label=plan.config_label(), overrides=plan.overrides, backbone=plan.backbone,
                      config=json.loads(json.dumps(dataclasses.asdict(plan.cfg), default=str)), seed=1993,
                      accuracy_matrix=matrix, test_counts=[10] * 11, increments=[1] * 11,
                      accuracy_per_task=[float(np.mean(r)) for r in matrix], views={},
                      metrics=metrics.summary("mtil", matrix))
        (out / plan.record_name).write_text(json.dumps(record))
    table = cli("table", "--benchmark", "moe-adapters-table1", "--results", str(out), "--quick", "--format", "csv")
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    blocks = {"Zero-shot": 1, "Full Fine-tune": 1, "Fine-tune Adapter": 1}  # the upper-bound block only
    for label in ("Zero-shot", "Full Fine-tune", "Fine-tune Adapter", "Continual-FT", "LwF", "iCaRL", "LwF-VR",
                  "WiSE-FT", "ZSCL", "Ours†", "Ours"):
        mine = [line.split(",") for line in lines if line.startswith(f"{label} [quick],")]
        assert len(mine) == blocks.get(label, 3), f"{label}: {len(mine)} quick rows"  # Transfer, Average, Last
        assert all(cells[-1] != "-" and cells[2] != "-" for cells in mine), mine


def test_all_zero_router_start_gives_equal_gates_and_the_plain_clip():
    """At the start every router is zero: without noise the k chosen gates are 1/k each, and every expert outputs
    zero (up projection zero), so the adapted CLIP scores exactly as the original."""
    m = _method(noise="off")
    m.eval()
    images = torch.randn(3, 3, 32, 32)
    classes = torch.tensor(m.scenario.tasks[0].classes)
    with torch.no_grad():
        adapted = m._scores(images, classes, 0)
        gates = m.blocks[0].last_gates
        plain = m._scores(images, classes, None)
    assert torch.equal((gates > 0).sum(1), torch.full((3,), m.cfg.top_k))
    assert torch.allclose(gates[gates > 0], torch.full_like(gates[gates > 0], 1 / m.cfg.top_k))
    torch.testing.assert_close(adapted, plain, atol=1e-5, rtol=0)
