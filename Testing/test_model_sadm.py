"""Tests of the SADM model family (LongitudinalDiffusionLib/models/sadm.py) at tiny size."""

from __future__ import annotations

import json

import pytest
import torch

from LongitudinalDiffusionLib.diffusion import SamplerSettings
from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.models import sadm
from LongitudinalDiffusionLib.progress import Cancelled, CancelToken

torch.set_num_threads(1)

SHAPE = (8, 16, 16)


def _tiny(seed: int = 0, randomise: bool = True) -> tuple[sadm.SADM, dict]:
    """The tiny model. MONAI zero-initialises the U-Net's residual and output convolutions
    (its eps is 0 whatever the input); ``randomise`` fills them so the conditioning shows."""
    config = sadm.default_config("tiny")
    torch.manual_seed(seed)
    model = sadm.build(config)
    if randomise:
        with torch.no_grad():
            for name, p in model.unet.named_parameters():
                if name.endswith("conv2.conv.weight") or name == "out.2.conv.weight":
                    p.normal_(0.0, 0.05)
    return model, config


def _timeline(n: int = 2, f: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(n, f, 1, *SHAPE, generator=g)
    ages = torch.tensor([[0.0, 3.0, 6.0, 9.0], [1.0, 2.0, 5.0, 12.0]])[:n, :f]
    present = torch.tensor([[True, False, True, False], [True, True, False, False]])[:n, :f]
    return frames, ages, present


def _settings(**kw) -> SamplerSettings:
    return SamplerSettings(**{"name": "ddpm", "steps": 3, "guidance": 1.1, "seed": 0, "variance": "fixed_large", **kw})


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def test_default_configs_are_json_and_follow_the_paper():
    for scale in ("paper", "demo", "tiny"):
        config = sadm.default_config(scale)
        assert json.loads(json.dumps(config)) == config
        assert config["prediction"] == "epsilon"
        assert config["p_uncond"] == 0.1
        assert config["sampler"]["guidance"] == pytest.approx(1.1)  # 1 + w, w = 0.1 (paper sec. 4.1)
        assert config["sampler"]["variance"] == "fixed_large"
    paper = sadm.default_config("paper")
    assert paper["schedule"]["num_steps"] == 1000 and paper["max_frames"] == 12
    assert sadm.default_config("demo")["schedule"] == {
        "kind": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "num_steps": 400,
    }
    with pytest.raises(ValueError, match="scale"):
        sadm.default_config("huge")


def test_build_rejects_a_patch_that_does_not_divide_the_image():
    config = sadm.default_config("tiny")
    config["network"]["attention"]["patch_size"] = [3, 8, 8]
    with pytest.raises(ValueError, match="patch_size"):
        sadm.build(config)


def test_shapes(tiny):
    model, config = tiny
    frames, ages, present = _timeline()
    c = model.condition(frames, ages, present, torch.tensor([1, 2]))
    assert c.shape == (2, 1, *SHAPE) and c.dtype == torch.float32
    x_t, t = torch.randn(2, 1, *SHAPE), torch.tensor([0, 399])
    eps = model(x_t, t, c)
    assert eps.shape == (2, 1, *SHAPE)
    assert not torch.allclose(model(x_t, t, torch.zeros_like(c)), eps)  # the U-Net reads c
    # Shorter timelines are padded to max_frames.
    assert model.condition(frames[:, :2], ages[:, :2], present[:, :2], torch.tensor([1, 1])).shape == c.shape


def test_condition_reads_context_frames_and_ages_only(tiny):
    model, _ = tiny
    frames, ages, present = _timeline(n=1)
    present = torch.tensor([[True, False, True, True]])
    target = torch.tensor([2])  # context: frames 0 and 3 (after the target); gap: frame 1; target 2
    with torch.no_grad():
        base = model.condition(frames, ages, present, target)

        def changed(frames=frames, ages=ages, present=present, target=target) -> bool:
            return not torch.allclose(model.condition(frames, ages, present, target), base)

        other = frames.clone()
        other[0, 0] += 0.5
        assert changed(frames=other)  # a context frame changes
        aged = ages.clone()
        aged[0, 0] = 1.5
        assert changed(ages=aged)  # only a context age changes
        aged = ages.clone()
        aged[0, 2] = 7.0
        assert changed(ages=aged)  # the target age changes
        aged = ages.clone()
        aged[0, 1] = 4.0
        assert changed(ages=aged)  # a gap keeps its age encoding
        assert changed(present=torch.tensor([[True, True, True, True]]))  # the gap becomes context
        other = frames.clone()
        other[0, 3] += 0.5
        assert changed(frames=other)  # a present frame after the target is context too
        # Never read: the image of a gap, the target's own image.
        other = frames.clone()
        other[0, 1:3] = torch.rand(2, 1, *SHAPE)
        assert not changed(frames=other)
        # Padding beyond the timeline's end is invisible: a shorter timeline is unaffected by
        # what would have been its later slots.
        short = model.condition(frames[:, :3], ages[:, :3], present[:, :3], target)
        assert short.shape == base.shape and not torch.allclose(short, base)


def test_loss_uses_target_and_context_with_dropout(tiny):
    model, config = tiny
    frames, ages, _ = _timeline()
    batch = {"frames": frames, "ages": ages, "present": torch.ones(2, 4, dtype=torch.bool)}
    batch["target_index"] = torch.tensor([2, 3])

    def value(batch, config=config) -> float:
        with torch.no_grad():
            return float(sadm.loss(model, batch, config, torch.Generator().manual_seed(5)))

    base = value(batch)
    assert value(batch) == base  # the generator fixes t, noise and dropout
    later = dict(batch, frames=frames.clone())
    later["frames"][0, 3] = 0.0  # after the target of row 0: context on both sides
    assert value(later) != base
    hidden = dict(batch, frames=frames.clone(), present=batch["present"].clone())
    hidden["present"][0, 3] = False
    moved = dict(hidden, frames=hidden["frames"].clone())
    moved["frames"][0, 3] = 0.0  # a missing frame's image is never read
    assert value(moved) == value(hidden)
    context = dict(batch, frames=frames.clone())
    context["frames"][:, 0] = 0.0
    assert value(context) != base
    dropped = dict(config, p_uncond=1.0)  # c replaced by zeros: the context no longer matters
    assert value(context, dropped) == value(batch, dropped)
    with pytest.raises(InputError, match="target"):
        sadm.loss(model, dict(batch, present=torch.zeros(2, 4, dtype=torch.bool)), config)


def test_context_reference_blends_the_neighbours_by_age(tiny):
    frames, ages, present = _timeline()
    ref = sadm.context_reference(frames, ages, present, torch.tensor([1, 2]))
    # Row 0: target at 3 mo between present 0 and 6 mo -> the mean of frames 0 and 2; row 1:
    # target at 5 mo after present 1 and 2 mo, nothing after -> frame 1 (2 mo).
    assert torch.allclose(ref[0], 0.5 * (frames[0, 0] + frames[0, 2]))
    assert torch.equal(ref[1], frames[1, 1])
    ages = ages.clone()
    ages[0, 2] = 12.0  # 3 mo between 0 and 12 mo: weights 3/4 and 1/4
    ref = sadm.context_reference(frames, ages, present, torch.tensor([1, 2]))
    assert torch.allclose(ref[0], 0.75 * frames[0, 0] + 0.25 * frames[0, 2])
    with pytest.raises(InputError, match="besides the target"):
        sadm.context_reference(frames, ages, torch.zeros_like(present), torch.tensor([1, 2]))


def test_residual_model_starts_from_its_reference():
    """An untrained residual x0-network (MONAI zero-initialises its output) returns its
    reference, the age-weighted blend of the neighbouring frames: the residual option's
    promise. The U-Net reads the reference as a third channel."""
    config = sadm.default_config("tiny") | {"residual": True, "prediction": "sample"}
    torch.manual_seed(3)
    model = sadm.build(config)
    assert model.unet.conv_in.conv.in_channels == 3
    frames, ages, present = _timeline(n=1)
    out = sadm.fill_sequence(model, frames, ages, present, config=config, settings=_settings(name="ddim", steps=4))
    # Frame 1 (3 mo) between 0 and 6 mo -> their mean; frame 3 (9 mo), the future -> frame 2 (6 mo).
    assert torch.allclose(out.frames[0, 1], 0.5 * (frames[0, 0] + frames[0, 2]), atol=1e-5)
    assert torch.allclose(out.frames[0, 3], frames[0, 2], atol=1e-5)
    batch = {"frames": frames, "ages": ages, "present": torch.ones(1, 4, dtype=torch.bool)}
    value = sadm.loss(model, batch | {"target_index": torch.tensor([2])}, config, torch.Generator().manual_seed(0))
    assert torch.isfinite(value)


def test_training_steps_lower_the_loss():
    model, config = _tiny(seed=3, randomise=False)
    frames, ages, _ = _timeline()
    batch = {"frames": frames, "ages": ages, "present": torch.ones(2, 4, dtype=torch.bool)}
    batch["target_index"] = torch.tensor([2, 3])

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(sadm.loss(model, batch, config, torch.Generator().manual_seed(s))) for s in range(4))

    before = evaluate()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(20):
        optimiser.zero_grad()
        sadm.loss(model, batch, config, torch.Generator().manual_seed(100 + step)).backward()
        optimiser.step()
    assert evaluate() < 0.8 * before


def test_fill_sequence_shapes_order_and_present_frames(tiny):
    model, config = tiny
    frames, ages, present = _timeline()
    frames_in, present_in = frames.clone(), present.clone()
    stages = []
    out = sadm.fill_sequence(
        model, frames, ages, present, config=config, settings=_settings(capture=2), progress=stages.append
    )
    assert out.frames.shape == frames.shape and out.frames.dtype == frames.dtype
    assert out.generated == [1, 2, 3]
    assert torch.equal(out.frames[present], frames[present])  # bit-identical
    assert not torch.equal(out.frames[~present], frames[~present])
    assert torch.equal(frames, frames_in) and torch.equal(present, present_in)  # inputs untouched
    assert out.frames.min() >= 0.0 and out.frames.max() <= 1.0  # tiny config clips x0 to [0, 1]
    names = list(dict.fromkeys(e.stage for e in stages))
    assert names == ["frame 1 (3 mo)", "frame 2 (5 mo)", "frame 3 (9 mo)"]
    assert [x.x_t.shape[0] for x in out.intermediates[3]] == [2, 2]  # both rows generate frame 3
    assert out.intermediates[1][0].x_t.shape == (1, 1, *SHAPE)
    assert out.seed == 0


def test_fill_sequence_conditions_on_generated_frames(tiny, monkeypatch):
    model, config = tiny
    frames, ages, present = _timeline(n=1)
    seen = []
    condition = model.condition

    def spy(frames, ages, present, target):
        seen.append((int(target[0]), present[0].tolist(), frames.clone()))
        return condition(frames, ages, present, target)

    monkeypatch.setattr(model, "condition", spy)
    out = sadm.fill_sequence(model, frames, ages, present, config=config, settings=_settings())
    assert [(k, p) for k, p, _ in seen] == [(1, [True, False, True, False]), (3, [True, True, True, False])]
    assert torch.equal(seen[1][2][0, 1], out.frames[0, 1])  # frame 1 as generated is context for frame 3


def test_fill_sequence_is_deterministic_by_seed(tiny):
    model, config = tiny
    frames, ages, present = _timeline()
    a = sadm.fill_sequence(model, frames, ages, present, config=config, settings=_settings(seed=7)).frames
    b = sadm.fill_sequence(model, frames, ages, present, config=config, settings=_settings(seed=7)).frames
    c = sadm.fill_sequence(model, frames, ages, present, config=config, settings=_settings(seed=8)).frames
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = sadm.fill_sequence(
        model, frames, ages, present, config=config, settings=_settings(), generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(g.frames, a) and g.seed is None


@pytest.mark.parametrize("guidance, factor", [(1.1, 2), (1.0, 1)])
def test_guidance_doubles_the_denoiser_batch(tiny, monkeypatch, guidance, factor):
    model, config = tiny
    frames, ages, present = _timeline()
    sizes = []
    forward = model.unet.forward

    def counting(x, timesteps, *args, **kwargs):
        sizes.append((x.shape[0], x.shape[1], timesteps.shape[0]))
        return forward(x, timesteps, *args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", counting)
    sadm.fill_sequence(model, frames, ages, present, config=config, settings=_settings(guidance=guidance))
    rows = [1, 1, 2]  # rows generating frames 1, 2, 3
    assert sizes == [(factor * r, 2, factor * r) for r in rows for _ in range(3)]


def test_cancel_raises_cancelled(tiny):
    model, config = tiny
    frames, ages, present = _timeline()
    token = CancelToken()
    events = []

    def on_progress(event):
        events.append(event)
        if event.stage.startswith("frame 2"):
            token.cancel()

    with pytest.raises(Cancelled):
        sadm.fill_sequence(
            model, frames, ages, present, config=config, settings=_settings(), progress=on_progress, cancel=token
        )
    assert {e.stage for e in events} == {"frame 1 (3 mo)", "frame 2 (5 mo)"}


def test_fill_sequence_rejects_bad_timelines(tiny):
    model, config = tiny
    frames, ages, present = _timeline()

    def fill(frames=frames, ages=ages, present=present):
        return sadm.fill_sequence(model, frames, ages, present, config=config, settings=_settings())

    five = torch.rand(2, 5, 1, *SHAPE)
    with pytest.raises(InputError, match="at most 4"):
        fill(five, torch.arange(5.0).repeat(2, 1), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(InputError, match="no frame is present"):
        fill(present=torch.tensor([[True, False, True, False], [False] * 4]))
    with pytest.raises(InputError, match="precedes the first present"):
        fill(present=torch.tensor([[False, True, True, False], [True] * 4]))
    with pytest.raises(InputError, match="sort the timeline"):
        fill(ages=torch.tensor([[0.0, 6.0, 3.0, 9.0], [1.0, 2.0, 5.0, 12.0]]))
    with pytest.raises(InputError, match="frames must be"):
        fill(frames=torch.rand(2, 4, 1, 8, 8, 8))


def test_weights_fit_another_grid_with_the_patch_positions_resampled():
    """Fine-tuning on a finer grid: every weight is taken as it is but the learned patch
    positions, which are resampled onto the new patch grid - a position field that is linear
    across the patches comes out exactly, the corners stay where they were."""
    source, config = _tiny()
    attention = source.attention
    gx, gy, gz = attention.grid
    dim = attention.space_pos.shape[-1]
    slopes = torch.randn(3, dim, generator=torch.Generator().manual_seed(0))

    def linear(nx: int, step_x: float) -> torch.Tensor:
        ii, jj, kk = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (nx, gy, gz)), indexing="ij")
        return (ii * step_x)[..., None] * slopes[0] + jj[..., None] * slopes[1] + kk[..., None] * slopes[2]

    with torch.no_grad():
        attention.space_pos.copy_(linear(gx, 1.0).reshape(1, 1, -1, dim))
    patch = config["network"]["attention"]["patch_size"]
    finer = {**config, "image_size": [config["image_size"][0] + patch[0], *config["image_size"][1:]]}
    target = sadm.build(finer)
    with pytest.raises(RuntimeError, match="space_pos"):
        target.load_state_dict(source.state_dict())
    target.load_state_dict(sadm.adapt_state(target, source, source.state_dict()))
    # gx + 1 patches now span what gx did: the field at (gx - 1) / gx patch steps
    torch.testing.assert_close(target.attention.space_pos.reshape(gx + 1, gy, gz, dim), linear(gx + 1, (gx - 1) / gx))
    for key, value in source.state_dict().items():
        if not key.endswith("space_pos"):
            assert torch.equal(target.state_dict()[key], value), key
