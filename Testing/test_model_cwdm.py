"""Tests of cWDM: the Haar wavelets against PyWavelets, the guided-diffusion U-Net port and
its checkpoint importer, the sampling with image-space clipping, the training loss, the
"any missing" option and the BraTS pre- and post-processing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pywt
import torch

from LongitudinalDiffusionLib.diffusion import SamplerSettings
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.models import cwdm
from LongitudinalDiffusionLib.models.wavelets import (
    LLL_SCALE,
    PYWT_KEYS,
    dwt3,
    from_wavelet,
    idwt3,
    to_wavelet,
)

torch.set_num_threads(1)


def tiny_config(**kwargs) -> dict:
    return cwdm.default_config("tiny", **kwargs)


def random_model(config: dict, seed: int = 0) -> cwdm.WaveletUNet:
    """A tiny network whose zero-initialised output convs are given random weights, so that
    its output depends on the input (a fresh model always predicts 0)."""
    torch.manual_seed(seed)
    model = cwdm.build(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any():
                p.normal_(0.0, 0.2 if name.startswith("out.") else 0.05)
    return model


def images(n: int, c: int, config: dict, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, c, *config["image_size"]), generator=g)


# ---- wavelets --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_dwt3_matches_pywavelets_per_subband_and_channel(dtype, tol):
    x = torch.randn(2, 3, 8, 6, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
    coeffs = dwt3(x)
    assert coeffs.shape == (2, 24, 4, 3, 2) and coeffs.dtype == dtype
    for n in range(2):
        for c in range(3):
            ref = pywt.dwtn(x[n, c].double().numpy(), "haar")
            for k, key in enumerate(PYWT_KEYS):
                got = coeffs[n, 8 * c + k].double().numpy()
                assert np.abs(got - ref[key]).max() < tol, (n, c, key)


def test_wavelet_round_trips_and_lll_scaling():
    x = torch.randn(1, 2, 6, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(idwt3(dwt3(x)), x, atol=1e-12)
    assert torch.allclose(from_wavelet(to_wavelet(x)), x, atol=1e-12)
    scaled, plain = to_wavelet(x), dwt3(x)
    assert torch.allclose(scaled[:, 0::8] * LLL_SCALE, plain[:, 0::8])
    assert torch.equal(scaled[:, 1:8], plain[:, 1:8])
    # the constant image 1 has all its energy in LLL: 2**1.5 / 3 per voxel after the scaling
    assert torch.allclose(to_wavelet(torch.ones(1, 1, 4, 4, 4))[:, 0], torch.full((1, 2, 2, 2), 2**1.5 / 3))


def test_wavelets_reject_odd_sizes_and_bad_channels():
    with pytest.raises(InputError, match="odd"):
        dwt3(torch.zeros(1, 1, 8, 7, 4))
    with pytest.raises(InputError, match="multiple of the 8"):
        idwt3(torch.zeros(1, 7, 2, 2, 2))
    with pytest.raises(InputError, match="N, C, D, H, W"):
        dwt3(torch.zeros(8, 8, 8))


# ---- network and importer --------------------------------------------------------------
def test_paper_network_has_upstream_layout_and_size():
    with torch.device("meta"):
        model = cwdm.build(cwdm.default_config("paper", target="FLAIR"))
        wide = cwdm.build(cwdm.default_config("paper", any_missing=True))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert abs(sum(p.numel() for p in model.parameters()) - 81.5e6) < 0.1e6
    assert len(shapes) == 394
    assert shapes["input_blocks.0.0.weight"] == (64, 32, 3, 3, 3)
    assert shapes["time_embed.2.weight"] == (256, 256)
    assert shapes["input_blocks.3.0.emb_layers.1.weight"] == (64, 256)  # the first down-sampling resblock
    assert shapes["input_blocks.4.0.skip_connection.weight"] == (128, 64, 1, 1, 1)
    assert shapes["middle_block.1.out_layers.3.weight"] == (256, 256, 3, 3, 3)
    assert shapes["output_blocks.0.0.in_layers.0.weight"] == (512,)  # 256 + 256 skip
    assert shapes["output_blocks.2.1.in_layers.2.weight"] == (256, 256, 3, 3, 3)  # the first up-sampling resblock
    assert shapes["out.2.weight"] == (8, 64, 3, 3, 3)
    assert not any("attn" in k or "qkv" in k or ".op." in k for k in shapes)
    assert wide.state_dict()["input_blocks.0.0.weight"].shape == (64, 44, 3, 3, 3)


def test_fresh_network_predicts_zero_and_group_norm_computes_in_float32():
    config = tiny_config()
    model = cwdm.build(config)
    x = torch.randn(2, 32, 8, 8, 4)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == (2, 8, 8, 8, 4) and torch.equal(out, torch.zeros_like(out))
    norm = cwdm.GroupNorm32(2, 4)
    h = torch.randn(1, 4, 3, 3, 3).bfloat16()
    assert norm(h).dtype == torch.bfloat16
    assert torch.equal(norm(h), torch.nn.functional.group_norm(h.float(), 2).bfloat16())


def test_network_variants_and_argument_errors():
    config = tiny_config()
    config["network"].update(resblock_updown=False, use_scale_shift_norm=True)
    model = random_model(config)
    keys = model.state_dict()
    assert "input_blocks.2.0.op.weight" in keys and "output_blocks.1.1.conv.weight" in keys
    assert keys["input_blocks.1.0.emb_layers.1.weight"].shape == (16, 32)  # scale and shift
    assert model(torch.randn(1, 32, 8, 8, 4), torch.tensor([5])).shape == (1, 8, 8, 8, 4)
    with pytest.raises(InputError, match="divisible by 2"):
        model(torch.randn(1, 32, 8, 8, 3), torch.tensor([5]))
    with pytest.raises(ValueError, match="num_groups"):
        cwdm.WaveletUNet(32, model_channels=12, num_groups=8)
    bad = tiny_config()
    bad["network"]["in_channels"] = 40
    with pytest.raises(InputError, match="in_channels"):
        cwdm.build(bad)


def upstream_tiny_config() -> dict:
    """The upstream layout (three conditions, mult 1,2,2, two resblocks) at 8 base channels."""
    config = tiny_config(target="T2w")
    config["network"].update(model_channels=8, channel_mult=[1, 2, 2], num_res_blocks=2, num_groups=4)
    return config


def test_importer_loads_every_tensor_key_for_key(tmp_path):
    config = upstream_tiny_config()
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) for k, v in cwdm.build(config).state_dict().items()}
    bare = tmp_path / "brats_1200000.pt"
    torch.save(state, bare)
    model, report = cwdm.import_upstream_checkpoint(bare, config)
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert report["tensors"] == len(state) and report["target"] == "T2w" and not report["prefix_stripped"]

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "step": torch.tensor(7)}, wrapped)
    model, report = cwdm.import_upstream_checkpoint(wrapped, config)
    assert report["nested_under"] == "state_dict" and report["prefix_stripped"]
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_importer_names_missing_unexpected_and_mis_shaped_keys(tmp_path):
    config = upstream_tiny_config()
    state = {k: torch.zeros(v.shape) for k, v in cwdm.build(config).state_dict().items()}
    del state["out.2.bias"]
    state["input_blocks.1.1.qkv.weight"] = torch.zeros(3)
    state["input_blocks.0.0.weight"] = torch.zeros(8, 44, 3, 3, 3)
    path = tmp_path / "t1_gen.pt"
    torch.save(state, path)
    with pytest.raises(InputError) as info:
        cwdm.import_upstream_checkpoint(path, config)
    message = str(info.value)
    assert str(path) in message
    assert "missing: out.2.bias" in message and "unexpected: input_blocks.1.1.qkv.weight" in message
    assert "input_blocks.0.0.weight (8, 44, 3, 3, 3) vs (8, 32, 3, 3, 3)" in message
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("hello")
    with pytest.raises(InputError, match="weights-only"):
        cwdm.import_upstream_checkpoint(not_weights, config)


def test_importer_takes_the_target_from_the_upstream_file_name(tmp_path, monkeypatch):
    path = tmp_path / "flair_gen.pt"
    torch.save({"time_embed.0.weight": torch.zeros(1)}, path)
    with pytest.raises(InputError, match="does not match the cWDM U-Net .in_channels=32, model_channels=64"):
        cwdm.import_upstream_checkpoint(path)
    # with the paper scale shrunk, an upstream-named file loads without a config
    monkeypatch.setitem(cwdm._SCALES, "paper", cwdm._SCALES["tiny"])
    torch.save(cwdm.build(cwdm.default_config("paper")).state_dict(), path)
    model, report = cwdm.import_upstream_checkpoint(path)
    assert report["target"] == "FLAIR" and report["target_source"] == "file name"
    assert not model.training
    path.rename(tmp_path / "mine.pt")
    _, report = cwdm.import_upstream_checkpoint(tmp_path / "mine.pt")
    assert report["target"] == "T1w" and report["target_source"].startswith("default")


# ---- configuration ---------------------------------------------------------------------
def test_configs_are_json_and_follow_upstream_condition_order():
    for scale in ("paper", "demo", "tiny"):
        for any_missing in (False, True):
            config = cwdm.default_config(scale, any_missing=any_missing)
            assert json.loads(json.dumps(config)) == config
    assert cwdm.upstream_conditions("T1w") == ["T1ce", "T2w", "FLAIR"]
    assert cwdm.upstream_conditions("T1ce") == ["T1w", "T2w", "FLAIR"]
    assert cwdm.upstream_conditions("T2w") == ["T1w", "T1ce", "FLAIR"]
    assert cwdm.upstream_conditions("FLAIR") == ["T1w", "T1ce", "T2w"]
    paper = cwdm.default_config("paper")
    assert paper["schedule"] == {"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_steps": 1000}
    assert paper["sampler"]["name"] == "ddpm" and paper["sampler"]["steps"] is None
    assert paper["sampler"]["variance"] == "fixed_large" and paper["prediction"] == "sample"
    assert (
        paper["network"]["in_channels"] == 32
        and cwdm.default_config("paper", any_missing=True)["network"]["in_channels"] == 44
    )
    with pytest.raises(InputError, match="unknown target"):
        cwdm.default_config("tiny", target="PD")


# ---- sampling --------------------------------------------------------------------------
def test_synthesize_shape_range_determinism_and_conditioning():
    config = tiny_config()
    model = random_model(config)
    conditions = images(2, 3, config, seed=4)
    events = []
    out = cwdm.synthesize(model, conditions, config=config, progress=events.append)
    assert out.sample.shape == (2, 1, 16, 16, 8) and out.sample.dtype == torch.float32
    assert float(out.sample.min()) >= 0.0 and float(out.sample.max()) <= 1.0
    assert float(out.sample.std()) > 0.01  # not a constant image
    assert events[-1].stage == "synthesize" and events[-1].step == events[-1].total == 4
    again = cwdm.synthesize(model, conditions, config=config)
    assert torch.equal(out.sample, again.sample)
    other_seed = cwdm.synthesize(
        model, conditions, config=config, settings=SamplerSettings(name="ddpm", steps=4, seed=1)
    )
    first_seed = cwdm.synthesize(
        model, conditions, config=config, settings=SamplerSettings(name="ddpm", steps=4, seed=0)
    )
    assert not torch.allclose(other_seed.sample, first_seed.sample)
    other_conditions = cwdm.synthesize(model, images(2, 3, config, seed=5), config=config)
    assert not torch.allclose(out.sample, other_conditions.sample)


def test_every_predicted_x0_is_clipped_in_image_space():
    config = tiny_config()
    model = random_model(config)
    conditions = images(1, 3, config, seed=6)
    # the raw network output, as an image, leaves [0, 1]: the clipping has work to do
    raw = model(torch.cat([torch.randn(1, 8, 8, 8, 4), to_wavelet(conditions)], dim=1), torch.tensor([999]))
    raw_image = from_wavelet(raw.detach())
    assert float(raw_image.min()) < -0.05 or float(raw_image.max()) > 1.05
    settings = SamplerSettings(name="ddpm", steps=6, variance="fixed_large", capture=6)
    out = cwdm.synthesize(model, conditions, config=config, settings=settings)
    assert len(out.intermediates) == 6
    for inter in out.intermediates:
        assert inter.x0.shape == inter.x_t.shape == (1, 1, 16, 16, 8)
        assert float(inter.x0.min()) >= -1e-5 and float(inter.x0.max()) <= 1 + 1e-5
    clipped = from_wavelet(cwdm.clip_in_image_space(raw.detach()))
    assert torch.allclose(clipped, raw_image.clamp(0, 1), atol=1e-5)


def test_any_missing_inputs_and_mask_validation():
    config = tiny_config(any_missing=True)
    assert config["network"]["in_channels"] == 44 and config["target"] is None
    model = random_model(config)
    volumes = images(2, 4, config, seed=7)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]])
    cond = cwdm.condition_channels(volumes, config, mask)
    assert cond.shape == (2, 36, 8, 8, 4)
    assert torch.equal(cond[0, 8:16], torch.zeros(8, 8, 8, 4)) and torch.equal(cond[1, 24:32], torch.zeros(8, 8, 8, 4))
    assert torch.equal(cond[0, 32:], mask[0].float()[:, None, None, None].expand(4, 8, 8, 4))
    out = cwdm.synthesize(model, volumes, config=config, mask=mask)
    assert out.sample.shape == (2, 1, 16, 16, 8)
    # what sits in the missing slot does not matter
    filled = volumes.clone()
    filled[0, 1] = 0.5
    assert torch.equal(cwdm.synthesize(model, filled, config=config, mask=mask).sample, out.sample)
    for bad, match in (
        (None, "needs a mask"),
        (torch.tensor([[1, 0, 0, 1], [1, 1, 1, 0]]), "exactly one"),
        (torch.ones(2, 4), "exactly one"),
        (torch.tensor([[1, 0, 1, 1]]), "shape"),
        (torch.tensor([[1, 0.5, 1, 0], [1, 1, 1, 0]]), "1 .available. or 0"),
    ):
        with pytest.raises(InputError, match=match):
            cwdm.synthesize(model, volumes, config=config, mask=bad)
    upstream = tiny_config()
    with pytest.raises(InputError, match="only used by an any_missing"):
        cwdm.synthesize(random_model(upstream), volumes[:, :3], config=upstream, mask=mask)
    with pytest.raises(InputError, match="does not match"):
        cwdm.synthesize(random_model(upstream), volumes, config=upstream)


# ---- training --------------------------------------------------------------------------
def test_twenty_adam_steps_lower_the_loss_on_a_fixed_batch():
    config = tiny_config()
    torch.manual_seed(8)
    model = cwdm.build(config)
    batch = {"target": images(2, 1, config, seed=9), "conditions": images(2, 3, config, seed=10)}
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)

    def fixed_loss():  # same steps and noise each time: one fixed batch
        return cwdm.loss(model, batch, config, generator=torch.Generator().manual_seed(0))

    first = float(fixed_loss().detach())
    for _ in range(20):
        optimiser.zero_grad()
        value = fixed_loss()
        value.backward()
        optimiser.step()
    last = float(fixed_loss().detach())
    assert last < 0.7 * first


def test_any_missing_loss_draws_or_takes_the_missing_modality():
    config = tiny_config(any_missing=True)
    model = random_model(config)
    volumes = images(2, 4, config, seed=11)
    drawn = cwdm.loss(model, {"conditions": volumes}, config, generator=torch.Generator().manual_seed(0))
    assert drawn.ndim == 0 and torch.isfinite(drawn)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]])
    implied = cwdm.loss(model, {"conditions": volumes, "mask": mask}, config, torch.Generator().manual_seed(1))
    target = torch.stack([volumes[0, 0], volumes[1, 2]])[:, None]
    given = cwdm.loss(
        model, {"conditions": volumes, "mask": mask, "target": target}, config, torch.Generator().manual_seed(1)
    )
    assert torch.equal(implied, given)
    with pytest.raises(InputError, match="target"):
        cwdm.loss(random_model(tiny_config()), {"conditions": volumes[:, :3]}, tiny_config())


# ---- BraTS pre- and post-processing ----------------------------------------------------
def test_percentile_normalisation():
    rng = np.random.default_rng(12)
    volume = rng.normal(100.0, 10.0, size=(20, 20, 20))
    volume[0, 0, 0] = 1e6  # an outlier that min-max alone would let dominate
    out = cwdm.normalise_percentiles(volume)
    assert out.dtype == np.float32 and float(out.min()) == 0.0 and float(out.max()) == 1.0
    lo, hi = np.percentile(volume, [0.1, 99.9])
    expected = (np.clip(volume, lo, hi) - lo) / (hi - lo)
    assert np.allclose(out, expected, atol=1e-6)
    assert np.quantile(out, 0.5) > 0.3  # the bulk is not squashed by the outlier
    assert not cwdm.normalise_percentiles(np.full((4, 4, 4), 7.0)).any()


def test_brats_grid_round_trip_and_background_rule():
    rng = np.random.default_rng(13)
    volume = rng.gamma(2.0, 100.0, size=cwdm.BRATS_SHAPE)
    grid, record = cwdm.preprocess_brats(volume)
    assert grid.shape == (224, 224, 160) and grid.dtype == np.float32
    normalised = cwdm.normalise_percentiles(volume)
    assert np.array_equal(grid[..., :155], normalised[8:-8, 8:-8, :])
    assert not grid[..., 155:].any()
    assert json.loads(json.dumps(record)) == record
    back = cwdm.postprocess_brats(grid, record)
    assert back.shape == cwdm.BRATS_SHAPE
    inside = normalised[8:-8, 8:-8, :]
    assert np.array_equal(back[8:-8, 8:-8, :], np.where(inside <= 0.04, 0, inside))
    assert not back[:8].any() and not back[:, -8:].any()
    assert (inside <= 0.04).any() and (inside > 0.04).any()
    with pytest.raises(InputError, match="240, 240, 155"):
        cwdm.preprocess_brats(np.zeros((240, 240, 160)))
    with pytest.raises(InputError, match="224, 224, 160"):
        cwdm.postprocess_brats(np.zeros((240, 240, 155)), record)
