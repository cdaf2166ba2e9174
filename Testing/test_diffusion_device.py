"""The device-dependent parts of the engine (diffusion/device.py, the layout logic of the
sampler): channels-last-3d on CUDA only, nothing changed on the CPU. CUDA is absent here, so
the decisions are tested as functions and the CUDA layout is exercised on the CPU."""

from __future__ import annotations

import pytest
import torch

from LongitudinalDiffusionLib.diffusion import SamplerSettings, Schedule, memory_format, prepare_network, sample
from LongitudinalDiffusionLib.diffusion import sampling as sampling_module
from LongitudinalDiffusionLib.diffusion.device import set_memory_format, to_memory_format
from LongitudinalDiffusionLib.models import interval, sadm

torch.set_num_threads(1)
CL3D = torch.channels_last_3d


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.05)
    return model.eval()


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_channels_last_3d_is_chosen_for_cuda(device):
    assert memory_format(device) == CL3D


@pytest.mark.parametrize("device", ["cpu", "meta", torch.device("cpu")])
def test_default_layout_everywhere_else(device):
    assert memory_format(device) == torch.contiguous_format


def test_prepare_network_on_cpu_keeps_the_weights_in_place_and_sets_eval_mode():
    torch.manual_seed(0)
    model = interval.build(interval.default_config("tiny")).train()
    before = {name: (p.data_ptr(), p.stride()) for name, p in model.state_dict().items()}
    assert prepare_network(model, "cpu") is model
    assert not model.training
    after = {name: (p.data_ptr(), p.stride()) for name, p in model.state_dict().items()}
    assert after == before


def test_to_memory_format_leaves_other_tensors_and_the_default_layout_alone():
    x = torch.randn(1, 2, 4, 4, 4)
    assert to_memory_format(x, torch.contiguous_format) is x
    flat = torch.randn(3, 4)
    assert to_memory_format(flat, CL3D) is flat
    y = to_memory_format(x, CL3D)
    assert y.is_contiguous(memory_format=CL3D) and torch.equal(y, x)


def test_the_cuda_layout_converts_conv_kernels_only_and_keeps_the_function():
    """What prepare_network does on CUDA, done on the CPU: Conv3d kernels channels-last-3d,
    SADM's 4-D position table left alone (``module.to(memory_format=...)`` would fail on it)."""
    config = sadm.default_config("tiny")
    torch.manual_seed(0)
    model = _randomised(sadm.build(config))
    x = torch.randn(1, 1, *config["image_size"])
    c = torch.randn(1, 1, *config["image_size"])
    t = torch.tensor([5])
    with torch.inference_mode():
        expected = model(x, t, c)
        set_memory_format(model, CL3D)
        got = model(to_memory_format(x, CL3D), t, to_memory_format(c, CL3D))
    kernel = model.unet.conv_in.conv.weight
    assert kernel.is_contiguous(memory_format=CL3D) and not kernel.is_contiguous()
    assert model.attention.space_pos.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sampling_in_the_cuda_layout_gives_the_same_contiguous_result(monkeypatch):
    """The sampler's channels-last-3d path (volumes, conditions, residual reference), run on the CPU."""
    config = interval.default_config("tiny")
    torch.manual_seed(0)
    model = _randomised(interval.build(config))
    source = torch.rand(1, 1, *config["image_size"]) * 2 - 1
    cond = {"source": source, "interval": torch.tensor([3.0])}
    args = dict(cond=cond, clip_x0=(-1.0, 1.0), reference=source)
    schedule = Schedule.from_config(config["schedule"])
    settings = SamplerSettings("ddim", 4, eta=0.5, seed=3, capture=2)

    def run():
        return sample(lambda x, t, c: model(x, t, c["source"], c["interval"]), tuple(source.shape), schedule,
                      "epsilon", settings, **args)  # fmt: skip

    plain = run()
    monkeypatch.setattr(sampling_module, "memory_format", lambda device: CL3D)
    set_memory_format(model, CL3D)
    channels_last = run()
    assert channels_last.sample.is_contiguous()
    assert all(i.x_t.is_contiguous() and i.x0.is_contiguous() for i in channels_last.intermediates)
    torch.testing.assert_close(channels_last.sample, plain.sample, atol=1e-5, rtol=1e-5)


def test_noise_is_the_generator_stream_of_randn():
    shape = (2, 3, 5, 6, 7)
    a = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    b = sampling_module._host_noise(shape, torch.Generator().manual_seed(11))
    assert torch.equal(a, b)


def test_schedule_tables_move_once_to_the_device():
    schedule = Schedule.linear(1e-4, 0.02, 100)
    assert schedule.to("cpu") is schedule
    moved = schedule.to("meta")
    assert moved.alphas_cumprod.device.type == "meta" and moved.betas.dtype == torch.float64
    assert moved.num_steps == 100 and moved.to_config() == schedule.to_config()
    assert schedule.alphas_cumprod.device.type == "cpu"


def _aten_ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("method", ["interval", "cwdm"])
def test_a_network_prepared_on_the_cpu_convolves_on_onednn_with_the_same_output(method, monkeypatch):
    """prepare_network on the CPU routes every Conv3d through oneDNN for inference (PyTorch's
    own choice for a batch of 1 on these grids is its native slow_conv3d); same output."""
    from LongitudinalDiffusionLib.diffusion.device import OneDNNConv3d
    from LongitudinalDiffusionLib.models import build, default_config

    monkeypatch.delenv("LONGDIFF_CPU_ONEDNN", raising=False)
    config = default_config(method, "tiny")
    torch.manual_seed(0)
    model = _randomised(build(method, config))
    if method == "interval":
        x = torch.randn(1, 1, *config["image_size"])
    else:  # cWDM's network runs on the wavelet subbands, half the grid
        x = torch.randn(1, config["network"]["in_channels"], *[s // 2 for s in config["image_size"]])
    t = torch.tensor([7])
    if method == "interval":
        source = torch.randn(1, 1, *config["image_size"])

        def forward():
            return model(x, t, source, torch.tensor([6.0]))
    else:

        def forward():
            return model(x, t)

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.inference_mode():
        expected = forward()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    assert prepare_network(model, "cpu") is model
    assert convs and all(type(m) is OneDNNConv3d and isinstance(m, torch.nn.Conv3d) for m in convs)
    assert "Conv3d(" in repr(convs[0])
    with torch.inference_mode():
        got = forward()
        routed = _aten_ops(forward)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "aten::mkldnn_convolution" in routed and "aten::slow_conv3d_forward" not in routed
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_onednn_route_has_a_switch_and_leaves_training_alone(monkeypatch):
    from LongitudinalDiffusionLib.diffusion.device import OneDNNConv3d, cpu_onednn_enabled, use_onednn_convolutions

    config = interval.default_config("tiny")
    torch.manual_seed(0)
    model = _randomised(interval.build(config))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]

    def routed() -> bool:
        kinds = {type(m) for m in convs}
        assert len(kinds) == 1
        return kinds == {OneDNNConv3d}

    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv("LONGDIFF_CPU_ONEDNN", off)
        assert not cpu_onednn_enabled()
        prepare_network(model, "cpu")
        assert not routed()
    monkeypatch.setenv("LONGDIFF_CPU_ONEDNN", "1")
    assert cpu_onednn_enabled()
    prepare_network(model, "cpu")
    assert routed()
    monkeypatch.setenv("LONGDIFF_CPU_ONEDNN", "0")
    prepare_network(model, "cpu")  # preparing again with the switch off undoes the route
    assert not routed()
    prepare_network(model, "cpu", onednn=True)  # the argument overrides the environment
    assert routed()
    assert use_onednn_convolutions(model, enabled=False) == len(convs) and not routed()
    use_onednn_convolutions(model)

    # with gradients on (training), the layers take Conv3d's own path and back-propagate as before
    x = torch.randn(1, 1, *config["image_size"])
    source, dt, t = torch.randn_like(x), torch.tensor([6.0]), torch.tensor([3])
    model.train()
    assert "aten::mkldnn_convolution" not in _aten_ops(lambda: model(x, t, source, dt))
    model(x, t, source, dt).square().mean().backward()
    routed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    use_onednn_convolutions(model, enabled=False)
    model(x, t, source, dt).square().mean().backward()
    for a, p in zip(routed_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_running_out_of_memory_is_recognised_by_its_type_and_reported_with_the_step():
    """torch's typed out-of-memory error and the CPU allocator's real failure are both out of
    memory; other runtime errors are not. A denoiser that cannot allocate stops the sampler
    with the library's OutOfMemory, naming the step and the batch, the cause kept."""
    from LongitudinalDiffusionLib.diffusion.device import is_out_of_memory
    from LongitudinalDiffusionLib.errors import OutOfMemory

    with pytest.raises(RuntimeError) as real:
        torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator refuses: a plain RuntimeError
    assert is_out_of_memory(real.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("The size of tensor a (8) must match the size of tensor b (4)"))
    assert not is_out_of_memory(ValueError("out of memory"))  # a message alone is not the sign

    def greedy(x, t, cond):
        return x + torch.empty(2**62, dtype=torch.uint8).float()[:1]

    schedule = Schedule.from_config({"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_steps": 10})
    where = r"generate: the CPU ran out of memory for a batch of shape \(1, 1, 4, 4, 4\)"
    with pytest.raises(OutOfMemory, match=where) as err:
        sample(greedy, (1, 1, 4, 4, 4), schedule, "epsilon", SamplerSettings("ddim", 2, seed=0), stage="generate")
    assert is_out_of_memory(err.value.__cause__)
