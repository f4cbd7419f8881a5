"""DDAS (MoE-Adapters' auto-selector): the AlexNet features, the autoencoders, the selection rule, its trainer phase,
its state dict and the offline failure. Tiny: random AlexNet weights at 32 px (256 features)."""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from cilbench.engine import trainer
from cilbench.engine.loader import TaskData
from cilbench.errors import CilbenchError
from cilbench.methods.base import TrainConfig
from cilbench.models.ddas import ALEXNET_FILE, DDAS, FEW_SHOT, FULL_SHOT, AlexNetFeatures, AutoEncoder
from tests._one_line import raised

T = 3  # tasks: autoencoders 0 (reference), 1, 2, 3


@pytest.fixture(scope="module")
def extractor() -> AlexNetFeatures:
    torch.manual_seed(0)
    return AlexNetFeatures(pretrained=False, input_size=32)


@pytest.fixture
def ddas(extractor) -> DDAS:
    torch.manual_seed(1)
    return DDAS(T, extractor)


def _images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)  # CLIP-normalised-like values


def test_defaults_cite_the_official_values():
    assert FULL_SHOT["lr"] == 0.01 and FULL_SHOT["threshold"] == 0.0655
    assert FEW_SHOT["lr"] == 0.003 and FEW_SHOT["threshold"] == 0.06
    assert FULL_SHOT["reference_iterations"] == FEW_SHOT["reference_iterations"] == 1000
    assert FULL_SHOT["task_iterations"] == FEW_SHOT["task_iterations"] == 300


def test_autoencoder_architecture_and_parameter_count():
    ae = AutoEncoder(43264)
    assert sum(p.numel() for p in ae.parameters()) == 8_696_164  # the slides' "8.7M"
    assert [type(m) for m in ae.modules()][1:] == [nn.Sequential, nn.Linear, nn.ReLU, nn.Sequential, nn.Linear,
                                                     nn.Sigmoid]
    assert ae.encoder[0].out_features == 100 and ae.decoder[0].in_features == 100
    small = AutoEncoder(8, hidden=5)
    x = torch.rand(4, 8)
    by_hand = torch.sigmoid(small.decoder[0](torch.relu(small.encoder[0](x))))
    torch.testing.assert_close(small(x), by_hand)


def test_alexnet_features_are_sigmoid_of_torchvision_conv5(extractor):
    from torchvision.models import alexnet

    assert extractor.feature_dim == 256
    assert len(extractor.body) == 11 and isinstance(extractor.body[-1], nn.Conv2d)  # conv5, before its ReLU
    assert not any(p.requires_grad for p in extractor.parameters())
    assert not extractor.train().training  # always in eval mode
    net = alexnet(weights=None)
    net.features.load_state_dict(extractor.body.state_dict())
    x = _images(4)
    torch.testing.assert_close(extractor(x), torch.sigmoid(net.features[:-2](x).flatten(1)))
    assert not extractor(x).requires_grad
    with torch.no_grad():
        assert extractor.body(torch.zeros(1, 3, 224, 224)).flatten(1).shape[1] == 256 * 13 * 13 == 43264
    assert not hasattr(extractor, "classifier")


def test_reconstruction_errors_are_per_image_mse(ddas):
    x = _images(5)
    errors = ddas.reconstruction_errors(x)
    assert errors.shape == (T + 1, 5)
    feats = ddas.features(x)
    for i, ae in enumerate(ddas.autoencoders):
        torch.testing.assert_close(errors[i], ((ae(feats) - feats) ** 2).mean(1))


def _errors(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_select_lowest_mean_error_wins_per_batch(ddas, monkeypatch):
    errors = _errors([0.05, 0.05], [0.06, 0.06], [0.03, 0.05], [0.05, 0.05])  # means .05 .06 .04 .05
    monkeypatch.setattr(ddas, "reconstruction_errors", lambda images: errors)
    assert ddas.select(_images(2)).tolist() == [1, 1]  # autoencoder 2 = task 1, for the whole batch
    assert ddas.decide(errors).tolist() == [1, 1]


def test_select_ties_go_to_the_lower_index(ddas):
    assert ddas.decide(_errors([0.05], [0.03], [0.04], [0.03])).tolist() == [0]
    assert ddas.decide(_errors([0.03], [0.04], [0.03], [0.03])).tolist() == [-1]  # the reference is lowest
    assert ddas.decide(_errors([0.05, 0.05], [0.02, 0.04], [0.04, 0.02], [0.03, 0.03])).tolist() == [0, 0]


def test_reference_winner_and_errors_above_the_threshold_mean_original_clip(ddas):
    assert ddas.decide(_errors([0.01, 0.01], [0.03, 0.03], [0.04, 0.04], [0.05, 0.05])).tolist() == [-1, -1]
    above = _errors([0.09], [0.07], [0.08], [0.09])
    assert ddas.decide(above).tolist() == [-1]
    assert ddas.decide(above, threshold=0.07).tolist() == [0]  # exactly at the threshold: kept
    at = _errors([0.09, 0.09], [0.0655, 0.0655], [0.08, 0.08], [0.09, 0.09])
    assert ddas.threshold == 0.0655 and ddas.decide(at).tolist() == [0, 0]
    assert ddas.decide(at, threshold=0.0654).tolist() == [-1, -1]


def test_per_image_decides_per_image(ddas, extractor):
    errors = _errors([0.05, 0.01, 0.09], [0.03, 0.05, 0.09], [0.04, 0.02, 0.08], [0.06, 0.06, 0.07])
    assert ddas.decide(errors, per_image=True).tolist() == [0, -1, -1]  # task 0; the reference; all above .0655
    assert ddas.decide(errors, per_image=True, threshold=0.07).tolist() == [0, -1, 2]
    assert ddas.decide(errors).tolist() == [1, 1, 1]  # batch means .05 .0567 .0467 .0633: task 1 for all ...
    assert ddas.decide(errors, threshold=0.04).tolist() == [-1, -1, -1]  # ... or the original CLIP for all
    assert DDAS(T, extractor, per_image=True).decide(errors).tolist() == [0, -1, -1]


def test_compete_trained_ignores_untrained_autoencoders(ddas, extractor):
    errors = _errors([0.05, 0.05], [0.04, 0.04], [0.01, 0.01], [0.03, 0.03])
    assert ddas.decide(errors).tolist() == [1, 1]  # official: untrained autoencoders compete too
    trained = DDAS(T, extractor, compete="trained")
    assert trained.decide(errors).tolist() == [-1, -1]  # nothing trained: only the reference competes
    trained.mark_trained(1)
    assert trained.decide(errors).tolist() == [0, 0]
    trained.mark_trained(3)
    assert trained.decide(errors).tolist() == [2, 2]
    assert trained.decide(errors, per_image=True).tolist() == [2, 2]
    with pytest.raises(CilbenchError, match="compete"):
        DDAS(T, extractor, compete="some")


def test_phase_settings(ddas):
    phase = ddas.phase(2, None, iterations=300, lr=FULL_SHOT["lr"], name="ddas")
    s = trainer.Settings.of(phase, TrainConfig())  # the method config's sgd / cosine / 5e-4 do not leak in
    assert (s.iterations, s.batch_size, s.optimizer, s.lr, s.weight_decay) == (300, 64, "adam", 0.01, 1e-4)
    assert (s.schedule, s.schedule_unit, s.warmup_epochs, s.warmup_iterations) == ("constant", "iteration", 0, 0)
    assert phase.augment and phase.data is None and list(phase.frozen) == [ddas.extractor]
    assert [p for g in phase.params for p in g["params"]] == list(ddas.autoencoders[2].parameters())
    decayed = trainer.Settings.of(ddas.phase(0, None, 1000, 0.01, "ddas", lr_decay_every_epochs=10), TrainConfig())
    assert decayed.schedule == "step" and decayed.lr_gamma == 0.1 and decayed.lr_milestones[:3] == (10, 20, 30)


def _fit(ddas: DDAS, index: int, n: int, iterations: int, lr: float, **kw) -> tuple[TaskData, list[float]]:
    """Run autoencoder ``index``'s phase through the trainer on ``n`` random 32 px images; the lr of every step."""
    rng = np.random.default_rng(0)
    data = TaskData(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n), np.zeros(n, np.int64))

    def transform(x: torch.Tensor, train: bool) -> torch.Tensor:
        return (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.26

    lrs: list[float] = []
    real = trainer.train_step

    def spy(step, optimizer, *args):
        lrs.append(optimizer.param_groups[0]["lr"])
        return real(step, optimizer, *args)

    task = SimpleNamespace(index=0, name="task 0")
    trainer.train_step = spy
    try:
        trainer.run_phase(ddas, ddas.phase(index, None, iterations, lr, "ddas", **kw), TrainConfig(), task, data,
                          transform, torch.device("cpu"), seed=0)
    finally:
        trainer.train_step = real
    return data, lrs


def test_a_phase_through_the_trainer_lowers_the_reconstruction_error(ddas):
    n = 96
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    x = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.26
    before = ddas.reconstruction_errors(x).mean(1)
    extractor_before = [p.clone() for p in ddas.extractor.parameters()]
    others = {i: [p.clone() for p in ddas.autoencoders[i].parameters()] for i in (0, 1, 3)}
    _, lrs = _fit(ddas, 2, n, iterations=40, lr=0.01)
    assert lrs == [0.01] * 40
    after = ddas.reconstruction_errors(x).mean(1)
    assert after[2] < 0.5 * before[2]
    for i, params in others.items():  # only autoencoder 2 moved; the extractor is frozen
        assert all(torch.equal(a, b) for a, b in zip(params, ddas.autoencoders[i].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(extractor_before, ddas.extractor.parameters()))
    assert not ddas.extractor.training


def test_the_official_step_decay_counts_passes_over_the_data(ddas):
    # 20 images, batch 64: one step per pass, so the lr is 0.01 * 0.1^(step // 10), as the official schedule
    _, lrs = _fit(ddas, 1, 20, iterations=25, lr=0.01, lr_decay_every_epochs=10)
    assert lrs == pytest.approx([0.01] * 10 + [0.001] * 10 + [0.0001] * 5)


def test_state_dict_excludes_the_extractor_and_round_trips(ddas, extractor):
    ddas.mark_trained(2)
    sd = ddas.state_dict()
    assert set(sd) == {"trained"} | {f"autoencoders.{i}.{part}.0.{w}" for i in range(T + 1)
                                     for part in ("encoder", "decoder") for w in ("weight", "bias")}
    assert sum(p.numel() for p in ddas.parameters()) == (T + 1) * ddas.autoencoder_parameters()
    assert ddas.autoencoder_parameters() == 2 * 256 * 100 + 100 + 256
    torch.manual_seed(5)
    other = DDAS(T, extractor)
    other.load_state_dict(sd)
    assert other.trained.tolist() == [False, False, True, False]
    for a, b in zip(ddas.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    parent = nn.Module()  # nested in a method: the parent's strict load does not ask for the extractor either
    parent.ddas = other
    parent.load_state_dict(parent.state_dict())
    assert not any("body" in k for k in parent.state_dict())


def test_to_moves_the_extractor_too():
    ddas = DDAS(1, AlexNetFeatures(pretrained=False, input_size=32)).to(torch.float64)
    assert ddas.extractor.body[0].weight.dtype == torch.float64
    assert ddas.autoencoders[0].encoder[0].weight.dtype == torch.float64
    assert ddas.select(_images(2)).shape == (2,)
    if torch.cuda.is_available():
        ddas = ddas.to("cuda")
        assert ddas.extractor.body[0].weight.is_cuda
        assert ddas.select(_images(2).cuda()).device.type == "cuda"


def test_offline_download_is_one_line_naming_the_hub_path(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    timeout = socket.getdefaulttimeout()
    seen = {}

    def unreachable(url, **kw):
        seen.update(kw, timeout=socket.getdefaulttimeout())
        print(f'Downloading: "{url}"')  # as torch.hub does, on stdout
        raise urllib.error.URLError("unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    with pytest.raises(CilbenchError) as err:
        AlexNetFeatures(pretrained=True, input_size=32)
    text = raised(err)
    assert "AlexNet" in text and "DDAS" in text and "unreachable" in text
    assert str(Path(torch.hub.get_dir()) / "checkpoints") in text and ALEXNET_FILE in text and "weights=" in text
    assert seen["weights_only"] is True and seen["timeout"] == 10
    assert socket.getdefaulttimeout() == timeout  # restored
    assert capsys.readouterr().out == ""  # the failed download leaves nothing but the one error line

    def bug(url, **kw):
        raise ValueError("a real bug")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", bug)
    with pytest.raises(ValueError):  # not a network failure: not hidden behind the offline hint
        AlexNetFeatures(pretrained=True, input_size=32)


def test_cached_or_local_weights_load_and_a_wrong_file_is_one_line(monkeypatch, tmp_path, extractor):
    state = {f"features.{k}": v.clone() for k, v in extractor.body.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(2, 2)  # the classifier of a full torchvision file is ignored
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: state)
    torch.manual_seed(9)
    cached = AlexNetFeatures(pretrained=True, input_size=32)
    x = _images(2)
    torch.testing.assert_close(cached(x), extractor(x))

    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    torch.manual_seed(9)
    torch.testing.assert_close(AlexNetFeatures(weights=path, input_size=32)(x), extractor(x))

    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(CilbenchError) as err:
        AlexNetFeatures(weights=path, input_size=32)
    text = raised(err)
    assert "missing features.0.weight" in text and "unexpected foo" in text and str(path) in text

    bad = dict(state, **{"features.0.weight": torch.zeros(1, 3, 3, 3)})
    torch.save(bad, path)
    with pytest.raises(CilbenchError) as err:
        AlexNetFeatures(weights=path, input_size=32)
    assert "size mismatch" in raised(err) or "shape" in raised(err)
    with pytest.raises(CilbenchError, match="no AlexNet weights file"):
        AlexNetFeatures(weights=tmp_path / "none.pth")
