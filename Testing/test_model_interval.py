"""Time-interval conditional diffusion model (models/interval.py, arXiv 2411.05860)."""

from __future__ import annotations

import json

import pytest
import torch

from LongitudinalDiffusionLib.diffusion import SamplerSettings, Schedule, sample
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.models import interval as iv
from LongitudinalDiffusionLib.models.layers import ScalarEmbedding

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def config():
    return iv.default_config("tiny")


@pytest.fixture()
def model(config):
    torch.manual_seed(0)
    model = iv.build(config).eval()
    # MONAI zero-initialises the second convolution of every residual block and the last one,
    # so an untrained U-Net ignores t and the interval; randomise them (as training would).
    for p in model.parameters():
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return model


def _images(n=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, size, size, size), generator=g) * 2 - 1


def test_configs_follow_the_paper_and_are_json():
    for scale in ("paper", "demo", "tiny"):
        cfg = iv.default_config(scale)
        assert json.loads(json.dumps(cfg)) == cfg
        assert cfg["prediction"] == "epsilon"
        assert any(cfg["network"]["attention_levels"][1:]) and not cfg["network"]["attention_levels"][0]
    paper = iv.default_config("paper")
    assert paper["schedule"] == {"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_steps": 1000}
    assert paper["image_size"] == [128, 160, 128]
    assert sum(p.numel() for p in iv.build(iv.default_config("demo")).parameters()) < 3e6
    with pytest.raises(ValueError, match="scale"):
        iv.default_config("huge")


def test_the_interval_embedding_is_added_to_the_timestep_embedding(model):
    unet = model.unet
    assert isinstance(model.interval_embedding, ScalarEmbedding) and unet.in_channels == 2
    assert any(k.startswith("unet.class_embedding.mlp") for k in model.state_dict())
    seen = {}
    block = unet.down_blocks[0].resnets[0]
    block.register_forward_hook(lambda mod, args, out: seen.update(emb=args[1]))
    x_t, t, src, dt = torch.randn(2, 1, 8, 8, 8), torch.tensor([3, 700]), _images(), torch.tensor([-6.0, 24.0])
    with torch.no_grad():
        model(x_t, t, src, dt)
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

        expected = unet.time_embed(get_timestep_embedding(t, unet.block_out_channels[0])) + model.interval_embedding(dt)
    torch.testing.assert_close(seen["emb"], expected)


def test_output_shape_and_every_condition_matters(model):
    x_t, t, src = torch.randn(2, 1, 8, 8, 8), torch.tensor([50, 50]), _images()
    dt = torch.tensor([12.0, 12.0])
    with torch.no_grad():
        base = model(x_t, t, src, dt)
        assert base.shape == x_t.shape and base.dtype == torch.float32
        assert (model(x_t, t, src, dt + 12) - base).abs().max() > 1e-4
        assert (model(x_t, t, src, -dt) - base).abs().max() > 1e-4  # backwards in time differs
        assert (model(x_t, t, _images(seed=9), dt) - base).abs().max() > 1e-4
        # rows are independent: each gets its own interval
        mixed = model(x_t, t, src, torch.tensor([12.0, 36.0]))
        torch.testing.assert_close(mixed[:1], base[:1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            mixed[1:], model(x_t[1:], t[1:], src[1:], torch.tensor([36.0])), atol=1e-5, rtol=1e-4
        )


def test_generate_is_deterministic_and_follows_the_interval(model, config):
    src = _images()
    events = []
    a = iv.generate(model, src, torch.tensor([12.0, 24.0]), config=config, progress=events.append)
    b = iv.generate(model, src, torch.tensor([12.0, 24.0]), config=config)
    assert a.sample.shape == src.shape and a.evaluations == config["sampler"]["steps"]
    assert float(a.sample.abs().max()) <= 1.0
    torch.testing.assert_close(a.sample, b.sample, rtol=0, atol=0)
    assert {e.stage for e in events} == {"generate"} and events[-1].step == events[-1].total
    # an untrained net's x0 saturates the [-1, 1] clip: widen it to see the interval's effect
    wide = {**config, "intensity_range": [-1e4, 1e4]}
    c = iv.generate(model, src, torch.tensor([12.0, 24.0]), config=wide)
    d = iv.generate(model, src, 60.0, config=wide, settings=SamplerSettings(name="ddim", steps=5, seed=0))
    assert (c.sample - d.sample).abs().max() > 1e-3
    with pytest.raises(InputError, match="interval"):
        iv.generate(model, src, torch.tensor([1.0, 2.0, 3.0]), config=config)
    with pytest.raises(InputError, match="source"):
        iv.generate(model, src[:, 0], 12.0, config=config)


def test_conditions_survive_the_engines_guidance_batching(model, config):
    """Under classifier-free guidance the engine stacks [cond, uncond] into one batch."""
    src, dt = _images(), torch.tensor([12.0, -12.0])
    calls = []

    def denoiser(x, t, c):
        calls.append(x.shape[0])
        return model(x, t, c["source"], c["interval"])

    cond = {"source": src, "interval": dt}
    uncond = {"source": torch.zeros_like(src), "interval": torch.zeros_like(dt)}
    sched = Schedule.from_config(config["schedule"])
    settings = SamplerSettings(name="ddim", steps=3, guidance=2.0, seed=0)
    out = sample(denoiser, tuple(src.shape), sched, "epsilon", settings, cond=cond, uncond=uncond)
    assert calls == [4, 4, 4] and out.sample.shape == src.shape
    plain = sample(denoiser, tuple(src.shape), sched, "epsilon", settings.merged(guidance=1.0), cond=cond)
    assert (out.sample - plain.sample).abs().max() > 1e-4


def test_training_lowers_the_loss(config):
    torch.manual_seed(0)
    model = iv.build(config)
    batch = {"source": _images(seed=2), "target": _images(seed=3), "interval": torch.tensor([12.0, 24.0])}

    def fixed_loss():  # same steps and noise every time: a function of the weights only
        return iv.loss(model, batch, config, generator=torch.Generator().manual_seed(0))

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        before = float(fixed_loss())
    for _ in range(20):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    with torch.no_grad():
        after = float(fixed_loss())
    assert after < 0.8 * before, (before, after)
