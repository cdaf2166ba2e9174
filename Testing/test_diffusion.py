"""The diffusion engine against a denoiser whose answer is known in closed form.

For data x0 ~ N(mu, s^2) (independently per voxel) the ideal denoiser is
E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) mu), a = abar_t.
A correct sampler driven by it must return samples with mean mu and spread s, whatever
the prediction type the denoiser speaks.
"""

from __future__ import annotations

import threading

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from LongitudinalDiffusionLib.diffusion import SamplerSettings, Schedule, sample, timesteps
from LongitudinalDiffusionLib.errors import LongitudinalDiffusionError
from LongitudinalDiffusionLib.progress import Cancelled, CancelToken

torch.set_num_threads(1)
MU, S = 0.3, 0.5
SHAPE = (2, 1, 16, 16, 16)


def gaussian_denoiser(schedule: Schedule, prediction: str, mu=MU, s=S, calls=None):
    abar = schedule.alphas_cumprod

    def denoise(x, t, cond):
        if calls is not None:
            calls.append((tuple(x.shape), None if cond is None else tuple(cond.shape)))
        a = abar[t].float().reshape(-1, 1, 1, 1, 1)
        m = mu if cond is None else mu + cond.reshape(-1, 1, 1, 1, 1)
        x0 = m + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x - a.sqrt() * m)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if prediction == "epsilon":
            return eps
        if prediction == "sample":
            return x0
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return denoise


@pytest.fixture(scope="module")
def sched():
    return Schedule.linear(1e-4, 0.02, 1000)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize(("name", "steps"), [("ddpm", None), ("ddim", 100), ("dpm++2m", 10)])
def test_samplers_recover_the_data_distribution(sched, prediction, name, steps):
    out = sample(gaussian_denoiser(sched, prediction), SHAPE, sched, prediction, SamplerSettings(name, steps, seed=1))
    assert out.sample.shape == SHAPE and out.sample.dtype == torch.float32
    assert out.sample.mean().item() == pytest.approx(MU, abs=0.03)
    assert out.sample.std().item() == pytest.approx(S, rel=0.06)
    assert out.evaluations == (1000 if steps is None else steps)


def test_high_order_solver_beats_ddim_at_equal_cost(sched):
    den = gaussian_denoiser(sched, "epsilon")
    err = {
        name: abs(sample(den, SHAPE, sched, "epsilon", SamplerSettings(name, 10, seed=1)).sample.std().item() - S)
        for name in ("ddim", "dpm++2m")
    }
    assert err["dpm++2m"] < 0.3 * err["ddim"]


def test_ddim_eta1_all_steps_matches_ddpm_in_distribution(sched):
    den = gaussian_denoiser(sched, "epsilon")
    stats = {}
    for name, eta in (("ddpm", 0.0), ("ddim", 1.0)):
        xs = torch.stack(
            [
                sample(den, (1, 1, 8, 8, 8), sched, "epsilon", SamplerSettings(name, None, eta=eta, seed=k)).sample
                for k in range(6)
            ]
        )
        stats[name] = (xs.mean().item(), xs.std().item())
    assert stats["ddim"][0] == pytest.approx(stats["ddpm"][0], abs=0.05)
    assert stats["ddim"][1] == pytest.approx(stats["ddpm"][1], rel=0.08)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_agrees_with_monai_scheduler(sched, variance):
    """Our first ancestral step equals MONAI's DDPMScheduler.step given the same noise draw."""
    monai = DDPMScheduler(
        1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02, clip_sample=False, variance_type=variance
    )
    shape = (1, 1, 4, 4, 4)
    den = gaussian_denoiser(sched, "epsilon")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    settings = SamplerSettings("ddpm", None, seed=3, capture=1000, variance=variance)
    ours = sample(den, shape, sched, "epsilon", settings, noise=x).intermediates[1]
    assert ours.t == 998
    expected = monai.step(den(x, torch.tensor([999]), None), 999, x, generator=torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(ours.x_t, expected, atol=1e-5, rtol=1e-4)


def test_ddim_matches_monai_ddim_deterministic(sched):
    steps = 20
    monai = DDIMScheduler(1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    monai.set_timesteps(steps)
    den = gaussian_denoiser(sched, "epsilon")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ref = x.clone()
    for t in monai.timesteps:
        ref = monai.step(den(ref, torch.full((2,), int(t)), None), int(t), ref)[0]
    ours = sample(den, SHAPE, sched, "epsilon", SamplerSettings("ddim", steps), noise=x).sample
    # Different step spacing (trailing vs leading) but the same deterministic flow: both land on the data.
    assert ours.mean().item() == pytest.approx(ref.mean().item(), abs=0.03)
    assert ours.std().item() == pytest.approx(ref.std().item(), rel=0.08)


def test_seeded_determinism_and_seed_sensitivity(sched):
    den = gaussian_denoiser(sched, "epsilon")
    run = lambda seed, name: sample(den, SHAPE, sched, "epsilon", SamplerSettings(name, 10, eta=1.0, seed=seed))  # noqa: E731
    for name in ("ddpm", "ddim", "dpm++2m"):
        a, b, c = run(7, name), run(7, name), run(8, name)
        assert torch.equal(a.sample, b.sample) and a.seed == 7
        assert not torch.equal(a.sample, c.sample)
    assert run(None, "ddim").seed is not None


def test_classifier_free_guidance_is_batched_and_combined(sched):
    calls = []
    den = gaussian_denoiser(sched, "sample", calls=calls)
    cond, uncond = torch.full((2,), 1.0), torch.zeros(2)
    settings = SamplerSettings("ddim", 5, guidance=1.5, seed=0)
    guided = sample(den, SHAPE, sched, "sample", settings, cond=cond, uncond=uncond)
    assert len(calls) == 5 and all(c == ((4, 1, 16, 16, 16), (4,)) for c in calls)
    # x0 predictions are linear in the condition's mean: guidance 1.5 extrapolates to mu + 1.5.
    assert guided.sample.mean().item() == pytest.approx(MU + 1.5, abs=0.05)
    calls.clear()
    plain = sample(den, SHAPE, sched, "sample", SamplerSettings("ddim", 5, guidance=1.0), cond=cond, uncond=uncond)
    assert len(calls) == 5 and calls[0][0][0] == 2
    assert plain.sample.mean().item() == pytest.approx(MU + 1.0, abs=0.05)


def test_clipping_and_intermediates(sched):
    den = gaussian_denoiser(sched, "epsilon", mu=0.0, s=3.0)
    out = sample(den, SHAPE, sched, "epsilon", SamplerSettings("ddim", 12, capture=4), clip_x0=(-1.0, 1.0))
    assert out.sample.min() >= -1 and out.sample.max() <= 1
    assert [i.step for i in out.intermediates] == [0, 4, 7, 11]
    assert out.intermediates[0].t == 999 and out.intermediates[-1].t == 0
    for it in out.intermediates:
        assert it.x0.abs().max() <= 1 and it.x_t.shape == SHAPE
    assert out.intermediates[0].x_t.std() > 0.9  # pure noise going in


def test_progress_events_and_prompt_cancel(sched):
    events = []
    sample(
        gaussian_denoiser(sched, "epsilon"),
        SHAPE,
        sched,
        "epsilon",
        SamplerSettings("ddim", 6),
        progress=events.append,
        stage="generate",
    )
    assert [e.step for e in events] == list(range(7))
    assert all(e.stage == "generate" and e.total == 6 for e in events)
    assert events[0].eta is None and events[3].eta is not None and events[-1].eta == 0

    token, evaluated = CancelToken(), []
    den = gaussian_denoiser(sched, "epsilon")

    def counting(x, t, c):
        evaluated.append(int(t[0]))
        if len(evaluated) == 3:
            threading.Thread(target=token.cancel).start()
            threading.Event().wait(0.05)
        return den(x, t, c)

    with pytest.raises(Cancelled, match="cancelled during generate"):
        sample(counting, SHAPE, sched, "epsilon", SamplerSettings("ddim", 50), cancel=token, stage="generate")
    assert len(evaluated) == 3  # stopped before the fourth network evaluation


def test_timesteps_and_settings_validation():
    assert timesteps(1000, None)[:2] == [999, 998] and len(timesteps(1000, None)) == 1000
    taus = timesteps(1000, 10)
    assert taus[0] == 999 and taus[-1] == 0 and len(taus) == 10 and taus == sorted(taus, reverse=True)
    assert timesteps(4, 50) == [3, 2, 1, 0]
    for bad in ({"name": "euler"}, {"steps": 0}, {"eta": 2.0}, {"variance": "learned"}):
        with pytest.raises(LongitudinalDiffusionError):
            SamplerSettings(**bad)
    with pytest.raises(LongitudinalDiffusionError, match="unknown sampler setting"):
        SamplerSettings.from_dict({"stepz": 3})
    assert SamplerSettings.from_dict(SamplerSettings("dpm++2m", 20).to_dict()) == SamplerSettings("dpm++2m", 20)


def test_schedules():
    lin = Schedule.from_config({"kind": "linear", "beta_start": 1e-4, "beta_end": 5e-3, "num_steps": 4000})
    assert (
        lin.num_steps == 4000
        and lin.betas[0].item() == pytest.approx(1e-4)
        and lin.betas[-1].item() == pytest.approx(5e-3)
    )
    assert Schedule.from_config(lin.to_config()).betas.equal(lin.betas)
    cos = Schedule.cosine(1000)
    assert cos.alphas_cumprod[0] > 0.999 and cos.alphas_cumprod[-1] < 1e-6
    x0, noise, t = torch.randn(3, 1, 4, 4, 4), torch.randn(3, 1, 4, 4, 4), torch.tensor([0, 500, 999])
    x_t = lin.q_sample(x0, t, noise)
    for pred in ("epsilon", "sample", "v_prediction"):
        target = lin.training_target(pred, x0, noise, t)
        torch.testing.assert_close(lin.to_x0(pred, target, x_t, t), x0, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        Schedule.from_config({"kind": "zigzag", "num_steps": 10})
    with pytest.raises(ValueError, match="unknown prediction"):
        lin.to_x0("score", x0, x_t, t)


def test_the_loop_drives_samplers_through_timesteps_and_step_and_names_none(sched, monkeypatch):
    """A sampler is a class behind timesteps()/step(); the loop in sample() names none of them."""
    import ast
    import inspect

    from LongitudinalDiffusionLib.diffusion import samplers, sampling

    tree = ast.parse(inspect.getsource(sampling.sample))
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not literals & set(samplers.SAMPLERS)
    assert samplers.SAMPLERS == ("ddpm", "ddim", "dpm++2m") and set(samplers.SAMPLER_CLASSES) == set(
        samplers.SamplerName
    )

    steps: list[tuple[int, int]] = []

    class Recording(samplers.DDIM):
        def step(self, x0, x, t, s, noise):
            steps.append((t, s))
            return super().step(x0, x, t, s, noise)

    settings = SamplerSettings("ddim", steps=6, seed=3)
    plain = sample(gaussian_denoiser(sched, "epsilon"), SHAPE, sched, "epsilon", settings)
    monkeypatch.setitem(samplers.SAMPLER_CLASSES, samplers.SamplerName.DDIM, Recording)
    recorded = sample(gaussian_denoiser(sched, "epsilon"), SHAPE, sched, "epsilon", settings)
    taus = timesteps(sched.num_steps, 6)
    assert steps == list(zip(taus[:-1], taus[1:])) and recorded.evaluations == len(taus)
    assert torch.equal(recorded.sample, plain.sample)
