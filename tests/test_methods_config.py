"""Method configs against their reference files, and `methods info` showing only the settings a method uses."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cilbench.engine.trainer import lr_factor
from cilbench.methods.base import TRAINING_SETTINGS
from cilbench.methods import load_all, load_method
from cilbench.methods.base import resolve_config


def test_finetune_defaults_are_pilots_finetune_json():
    # LAMDA-PILOT exps/finetune.json (= finetune_inr.json) read by models/finetune.py
    cfg = load_method("finetune").Config()
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.first_epochs) == (1e-3, 128, 20, None)  # 20 on every task
    assert (cfg.first_weight_decay, cfg.weight_decay, cfg.optimizer, cfg.momentum) == (5e-4, 2e-4, "sgd", 0.9)
    assert cfg.backbone_lr is None  # one parameter group, as PILOT's SGD over all parameters
    # MultiStepLR(milestones=[40, 70]) stepped per epoch: the lr never moves within 20 epochs
    assert (cfg.schedule, cfg.schedule_unit, cfg.lr_milestones) == ("step", "epoch", (40, 70))
    assert {lr_factor(e, 20, 0, cfg.schedule, 0.0, 1, cfg.lr_milestones, cfg.lr_gamma) for e in range(20)} == {1.0}
    # joint: one task (index 0), so PILOT's first-task weight decay
    joint = load_method("joint").Config()
    assert (joint.loss_scope, joint.epochs, joint.first_weight_decay, joint.lr) == ("seen", 20, 5e-4, 1e-3)


@pytest.mark.parametrize("name", ["finetune", "joint", "finetune-adapter", "aper-adapter", "ranpac", "ease", "cicae",
                                  "slca"])
def test_stage_one_schedules_step_once_per_epoch(name):
    # PILOT / RanPAC / EASE / SSIAT: CosineAnnealingLR(T_max=epochs) and SLCA / PILOT finetune: MultiStepLR, all
    # stepped after each epoch
    assert load_method(name).Config().schedule_unit == "epoch"


def test_simplecil_batch_is_pilots_module_constant():
    cfg = load_method("simplecil").Config()
    assert cfg.eval_batch_size == 128  # PILOT models/simplecil.py batch_size = 128


def _info(cli, name: str) -> dict:
    res = cli("methods", "info", name, "--json")
    assert res.code == 0, res.err
    return json.loads(res.out)


def test_methods_info_hides_the_training_settings_of_methods_that_do_not_train(cli):
    shown = _info(cli, "simplecil")["defaults"]
    assert not set(TRAINING_SETTINGS) & set(shown)  # no lr, epochs, optimizer, schedule ...
    assert shown["eval_batch_size"] == 128 and "transform" in shown
    assert not set(TRAINING_SETTINGS) & set(_info(cli, "zeroshot-clip")["defaults"])
    finetune = _info(cli, "finetune")["defaults"]
    assert {"lr", "epochs", "optimizer", "first_weight_decay", "schedule_unit", "label_smoothing"} <= set(finetune)
    assert "label_smoothing" not in _info(cli, "slca")["defaults"]  # its losses have none
    text = cli("methods", "info", "simplecil")
    assert text.code == 0 and "eval_batch_size" in text.out and "momentum" not in text.out


@pytest.mark.parametrize("name", load_all())
def test_unused_settings_are_settings_of_the_method(name):
    cls = load_method(name)
    unused = set(getattr(cls, "unused_settings", ()))
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    assert unused <= fields
    assert not unused & set(cls.quick) and all(not unused & set(p) for p in cls.presets.values())
    resolve_config(cls, "digits", True, {})  # the quick profile is a valid config
