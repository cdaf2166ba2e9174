"""Cas-DiffCom (models/cas_diffcom.py): the AsMM generator, the SR refiner and the cascade."""

from __future__ import annotations

import json

import pytest
import torch

from LongitudinalDiffusionLib.diffusion import SamplerSettings, Schedule
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.models import cas_diffcom as cd
from LongitudinalDiffusionLib.progress import Cancelled, CancelToken

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def config():
    return cd.default_config("tiny")


@pytest.fixture()
def model(config):
    torch.manual_seed(0)
    model = cd.build(config).eval()
    # MONAI zero-initialises the second convolution of every residual block and the last one,
    # so an untrained refiner ignores t; randomise them (as training would).
    for p in model.refiner.parameters():
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return model


def _images(n=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, size, size, size), generator=g) * 2 - 1


def _counter(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_configs_follow_the_paper_and_are_json():
    for scale in ("paper", "demo", "tiny"):
        cfg = cd.default_config(scale)
        assert json.loads(json.dumps(cfg)) == cfg
        assert cfg["prediction"] == "epsilon" and cfg["sampler"]["name"] == "ddim"
        assert [2 * s for s in cfg["image_size"]] == cfg["sr_image_size"]
    paper = cd.default_config("paper")
    assert paper["schedule"] == {"kind": "linear", "beta_start": 1e-4, "beta_end": 5e-3, "num_steps": 4000}
    assert paper["refine_schedule"] == {"kind": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "num_steps": 1000}
    assert paper["image_size"] == [80, 96, 80] and paper["sr_image_size"] == [160, 192, 160]
    assert len(paper["network"]["generator"]["channels"]) == 4  # 4 residual blocks per encoder
    demo = cd.build(cd.default_config("demo"))
    millions = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (demo.generator, demo.refiner)]
    assert all(0.3 < m < 3.0 for m in millions), millions  # CPU-sized
    with pytest.raises(ValueError, match="scale"):
        cd.default_config("huge")


def test_generator_guidance_features_do_not_depend_on_x_t_or_t(model):
    gen = model.generator
    guide, ages = _images(), (torch.tensor([3.0, 12.0]), torch.tensor([9.0, 24.0]))
    with torch.no_grad():
        feats = gen.encode_guidance(guide, *ages)
        assert [feats[f"guidance{i}"].shape[1:] for i in range(2)] == [(8, 8, 8, 8), (16, 4, 4, 4)]
        assert feats["ages"].shape == (2, 2, 32)
        x_t, t = torch.randn(2, 1, 8, 8, 8), torch.tensor([5, 3000])
        eps = gen.denoise(x_t, t, feats)
        assert eps.shape == x_t.shape and eps.dtype == torch.float32
        # the one-call forward is the same computation
        torch.testing.assert_close(gen(x_t, t, guide, *ages), eps)
        # the image encoder sees t, the guidance encoder has no time input at all
        assert not torch.allclose(gen.denoise(x_t, torch.tensor([6, 3001]), feats), eps)
        assert all(block.temb is None for block in gen.guidance_encoder.blocks)
        assert all(block.temb is not None for block in gen.image_encoder.blocks)


def test_every_condition_changes_the_generator_output(model):
    gen = model.generator
    guide, x_t, t = _images(), torch.randn(2, 1, 8, 8, 8), torch.tensor([100, 100])
    ga, ta = torch.tensor([3.0, 3.0]), torch.tensor([12.0, 12.0])
    with torch.no_grad():
        base = gen(x_t, t, guide, ga, ta)
        for changed in (
            gen(x_t, t, _images(seed=7), ga, ta),
            gen(x_t, t, guide, ga + 6, ta),
            gen(x_t, t, guide, ga, ta + 6),
        ):
            assert (changed - base).abs().max() > 1e-4
        # batch rows are independent (what the engine's batching relies on)
        one = gen(x_t[:1], t[:1], guide[:1], ga[:1], ta[:1] + 6)
        both = gen(x_t, t, guide, ga, torch.tensor([18.0, 12.0]))
        torch.testing.assert_close(both[:1], one, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(both[1:], base[1:], atol=1e-5, rtol=1e-4)


def test_refiner_upsamples_by_transposed_convolution(model):
    low = _images()
    with torch.no_grad():
        up = model.refiner.upsample(low)
        assert isinstance(model.refiner.up, torch.nn.ConvTranspose3d)
        assert up.shape == (2, 2, 16, 16, 16)
        # initialised as trilinear interpolation: interior voxels match F.interpolate
        ref = torch.nn.functional.interpolate(low, scale_factor=2, mode="trilinear", align_corners=False)
        torch.testing.assert_close(up[:, 0, 1:-1, 1:-1, 1:-1], ref[:, 0, 1:-1, 1:-1, 1:-1])
        x_t, t = torch.randn(2, 1, 16, 16, 16), torch.tensor([10, 900])
        eps = model.refiner.denoise(x_t, t, up)
        assert eps.shape == x_t.shape
        assert (model.refiner(x_t, t, _images(seed=5)) - eps).abs().max() > 1e-4


def test_complete_runs_encoders_once_and_reports_both_stages(model, config):
    guide_calls = _counter(model.generator.guidance_encoder)
    image_calls = _counter(model.generator.image_encoder)
    up_calls = _counter(model.refiner.up)
    events = []
    settings = SamplerSettings(name="ddim", steps=5, seed=3, capture=2)
    out = cd.complete(
        model,
        _images(),
        torch.tensor([3.0, 6.0]),
        torch.tensor([12.0, 24.0]),
        config=config,
        settings=settings,
        refine_settings=settings,
        progress=events.append,
    )
    assert len(guide_calls) == 1 and len(image_calls) == 5 and len(up_calls) == 1
    assert out.low_res.shape == (2, 1, 8, 8, 8) and out.high_res.shape == (2, 1, 16, 16, 16)
    assert out.low_res.dtype == torch.float32 and out.low_res.device.type == "cpu"
    assert float(out.low_res.abs().max()) <= 1.0 and float(out.high_res.abs().max()) <= 1.0
    assert {e.stage for e in events} == {"generate", "refine"}
    assert [e.step for e in events if e.stage == "refine"][-1] == 5
    assert sorted(out.intermediates) == ["generate", "refine"] and len(out.intermediates["refine"]) == 2


def test_complete_is_deterministic_and_follows_the_target_age(model, config):
    guide = _images(n=1)

    def run(age, refine=True):
        return cd.complete(model, guide, 3.0, age, config=config, refine=refine)

    a, b = run(12.0), run(12.0)
    torch.testing.assert_close(a.low_res, b.low_res, rtol=0, atol=0)
    torch.testing.assert_close(a.high_res, b.high_res, rtol=0, atol=0)
    assert (run(20.0).low_res - a.low_res).abs().max() > 1e-4
    only = run(12.0, refine=False)
    assert only.high_res is None and list(only.intermediates) == ["generate"]
    torch.testing.assert_close(only.low_res, a.low_res, rtol=0, atol=0)


def test_complete_checks_inputs_and_honours_cancel(model, config):
    with pytest.raises(InputError, match="guidance"):
        cd.complete(model, torch.zeros(1, 8, 8, 8), 3.0, 6.0, config=config)
    with pytest.raises(InputError, match="multiple of 2"):
        cd.complete(model, torch.zeros(1, 1, 7, 8, 8), 3.0, 6.0, config=config)
    with pytest.raises(InputError, match="target_age"):
        cd.complete(model, _images(), 3.0, torch.tensor([1.0, 2.0, 3.0]), config=config)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        cd.complete(model, _images(n=1), 3.0, 6.0, config=config, cancel=token)


@pytest.mark.parametrize("stage", ["generator", "refiner"])
def test_training_lowers_each_stage_loss(config, stage):
    torch.manual_seed(0)
    model = cd.build(config)
    low, high = _images(seed=2), _images(size=16, seed=3)
    if stage == "generator":
        batch = {
            "stage": stage,
            "target_lr": low,
            "guidance_lr": _images(seed=4),
            "guidance_age": torch.tensor([3.0, 6.0]),
            "target_age": torch.tensor([9.0, 12.0]),
        }
        params = model.generator.parameters()
    else:
        batch = {"stage": stage, "target_hr": high, "low_res": low}
        params = model.refiner.parameters()

    def fixed_loss():  # same steps and noise every time: a function of the weights only
        return cd.loss(model, batch, config, generator=torch.Generator().manual_seed(0))

    opt = torch.optim.Adam(params, lr=2e-3)
    with torch.no_grad():
        before = float(fixed_loss())
    for _ in range(20):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    with torch.no_grad():
        after = float(fixed_loss())
    assert after < 0.8 * before, (before, after)


def test_loss_rejects_unknown_stage(model, config):
    with pytest.raises(ValueError, match="stage"):
        cd.loss(model, {"stage": "both"}, config)
    assert Schedule.from_config(config["schedule"]).num_steps == 4000
