"""DDM (LongitudinalDiffusionLib.models.ddm): networks, loss, frame interpolation, upstream import."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.blocks import Warp

from LongitudinalDiffusionLib.errors import InputError
from LongitudinalDiffusionLib.models import ddm
from LongitudinalDiffusionLib.progress import Cancelled, CancelToken

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")

# Keys and shapes of upstream torchDDM/DDM's generator state dict (paper config), read off its
# UNet(inner_channel=8, channel_multiplier=[1,2,4,4], res_blocks=1) and registUnetBlock(2, ...).
UPSTREAM_PAPER_KEYS = {
    "denoise_fn.time_mlp.1.weight": (32, 8),
    "denoise_fn.time_mlp.3.bias": (8,),
    "denoise_fn.downs.0.weight": (8, 3, 3, 3, 3),
    "denoise_fn.downs.1.res_block.block1.block.0.bias": (8,),
    "denoise_fn.downs.1.res_block.block2.block.3.weight": (8, 8, 3, 3, 3),
    "denoise_fn.downs.3.res_block.mlp.1.bias": (16,),
    "denoise_fn.downs.3.res_block.res_conv.bias": (16,),
    "denoise_fn.downs.6.conv.weight": (32, 32, 3, 3, 3),
    "denoise_fn.mid.0.attn.qkv.weight": (96, 32, 1, 1, 1),
    "denoise_fn.mid.0.attn.out.bias": (32,),
    "denoise_fn.ups.4.res_block.res_conv.weight": (32, 48, 1, 1, 1),
    "denoise_fn.ups.7.res_block.block1.block.3.weight": (16, 24, 3, 3, 3),
    "denoise_fn.ups.9.res_block.mlp.1.weight": (8, 8),
    "denoise_fn.final_conv.block.3.weight": (1, 8, 3, 3, 3),
    "field_fn.inconv.block.block.0.weight": (16, 2, 3, 3, 3),
    "field_fn.downconv1.block.block.0.weight": (32, 16, 3, 3, 3),
    "field_fn.upconv1.upconv.weight": (32, 32, 3, 3, 3),
    "field_fn.upconv1.block.block.0.weight": (32, 64, 3, 3, 3),
    "field_fn.keepblock.block.0.weight": (8, 32, 3, 3, 3),
    "field_fn.upconv4.block.block.0.bias": (8,),
    "field_fn.outconv.block.weight": (3, 8, 3, 3, 3),
}
UPSTREAM_PAPER_TENSORS = 217  # + the inv_freq buffer
UPSTREAM_PAPER_PARAMETERS = 1_076_964


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = ddm.default_config("tiny")
    return ddm.build(config), config


def pair(seed: int = 0, size=(16, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth source blob and the same blob shifted: a registration problem with an answer."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij")
    centre = torch.tensor(size, dtype=torch.float32) / 2 + torch.rand(3, generator=g) - 0.5

    def blob(shift: float) -> torch.Tensor:
        r2 = (d - centre[0]) ** 2 + (h - centre[1] - shift) ** 2 + (w - centre[2]) ** 2
        return (2 * torch.exp(-r2 / 18.0) - 1).reshape(1, 1, *size)

    return blob(0.0), blob(2.0)


# -- configuration and networks ---------------------------------------------------------------------
def test_configs_are_json_and_paper_matches_upstream():
    paper = ddm.default_config("paper")
    assert json.loads(json.dumps(paper)) == paper
    den = paper["network"]["denoiser"]
    assert [den["inner_channel"] * m for m in den["channel_mults"]] == [8, 16, 32, 32]
    assert (den["res_blocks"], den["norm_groups"], den["attention_heads"]) == (1, 4, 4)
    assert paper["network"]["field"]["encoder_channels"] == [16, 32, 32, 32, 32]
    assert paper["network"]["field"]["decoder_channels"] == [32, 32, 32, 8, 8, 3]
    assert paper["schedule"] == {"kind": "linear", "beta_start": 1e-6, "beta_end": 1e-2, "num_steps": 2000}
    assert paper["loss"] == {"lambda": 20.0, "lambda_R": 1.0, "ncc_window": 9}
    assert paper["image_size"] == [128, 128, 32] and paper["normalisation"] == "minmax_pm1"
    model = ddm.build(paper)
    assert sum(p.numel() for p in model.parameters()) == UPSTREAM_PAPER_PARAMETERS
    for scale in ("demo", "tiny"):
        config = ddm.default_config(scale)
        assert json.loads(json.dumps(config)) == config
        assert all(s % ddm.build(config).factor == 0 for s in config["image_size"])
    with pytest.raises(ValueError, match="unknown scale"):
        ddm.default_config("huge")


def test_denoiser_and_field_shapes_and_conditioning(tiny):
    model, _ = tiny
    s, t = pair()
    x_t = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        code = model.code(s, t, x_t, torch.tensor([0]))
        assert code.shape == (1, 1, 16, 16, 16) and code.dtype == torch.float32
        assert not torch.allclose(code, model.code(s, t, x_t, torch.tensor([50])))  # the step matters
        assert not torch.allclose(code, model.code(t, t, x_t, torch.tensor([0])))  # the source matters
        field = model.field(s, code)
        assert field.shape == (1, 3, 16, 16, 16) and field.dtype == torch.float32
        assert not torch.allclose(field, model.field(s, 2 * code))  # the code matters
    emb = model.denoise_fn.step_embedding(torch.tensor([0, 3]))
    assert torch.equal(emb[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # sin half first, as upstream
    args = torch.tensor([3.0, 0.03])  # t * 10000^(-2k/4)
    assert torch.allclose(emb[1], torch.cat([args.sin(), args.cos()]))


def test_smoothness_is_forward_difference_l2():
    field = torch.zeros(1, 3, 5, 6, 7)
    assert ddm.smoothness(field + 4.0) == 0
    field[:, 0] = 0.5 * torch.arange(5.0).reshape(5, 1, 1)  # d phi_D / dD = 0.5, one channel of three
    assert torch.isclose(ddm.smoothness(field), torch.tensor(0.25 / 3 / 3))


# -- training loss -------------------------------------------------------------------------------------
def test_loss_parts_weighting_and_determinism(tiny):
    model, config = tiny
    s, t = pair()
    batch = {"source": s, "target": t}
    total, parts = ddm.loss(model, batch, config, torch.Generator().manual_seed(3), return_parts=True)
    assert total.ndim == 0 and torch.isfinite(total)
    expected = parts["diffuse"] + 20.0 * (parts["ncc"] + 1.0 * parts["smooth"])
    assert torch.isclose(total.detach(), expected) and torch.isclose(parts["total"], expected)
    assert -1.0 <= parts["ncc"] <= 0.0 and parts["smooth"] >= 0
    again = ddm.loss(model, batch, config, torch.Generator().manual_seed(3))
    assert torch.equal(total, again)
    with pytest.raises(InputError, match="multiple of 16"):
        ddm.loss(model, {"source": s[..., :8], "target": t[..., :8]}, config)


def test_twenty_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    config = ddm.default_config("tiny")
    model = ddm.build(config)
    s, t = pair(seed=2)
    batch = {"source": s, "target": t}

    def value() -> tuple[torch.Tensor, dict]:
        return ddm.loss(model, batch, config, torch.Generator().manual_seed(7), return_parts=True)

    before = value()[1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(20):
        opt.zero_grad()
        value()[0].backward()
        opt.step()
    after = value()[1]
    assert after["total"] < before["total"] - 0.5
    assert after["ncc"] < before["ncc"] and after["diffuse"] < before["diffuse"]  # both modules learn


# -- inference -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moving(tiny):
    """The tiny model with its last field layer scaled up so fields move labels by voxels."""
    model, config = tiny
    moved = ddm.build(config)
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        moved.field_fn.outconv.weight.mul_(400.0)
    return moved, config


def test_interpolate_frames_fields_labels(moving):
    model, config = moving
    s, t = pair()
    labels = (s > 0).long() + (s > 0.6).long()  # 0, 1, 2
    model.train()
    out = ddm.interpolate(model, s, t, [0.0, 0.5, 1.0], config=config, source_labels=labels, device="cpu")
    assert model.training  # restored
    assert out.frames.shape == (3, 1, 16, 16, 16) and out.frames.dtype == torch.float32
    assert out.fields.shape == (3, 3, 16, 16, 16) and out.fields.dtype == torch.float32
    assert out.labels.shape == (3, 1, 16, 16, 16) and out.labels.dtype == torch.long
    assert out.code.shape == (1, 1, 16, 16, 16) and torch.equal(out.gammas, torch.tensor([0.0, 0.5, 1.0]))
    model.eval()
    with torch.no_grad():
        code = model.code(s, t, t, torch.tensor([0]))  # ONE pass at t = 0 with x_t = T
        assert torch.equal(out.code, code)
        for i, g in enumerate([0.0, 0.5, 1.0]):
            assert torch.equal(out.fields[i : i + 1], model.field(s, g * code))
    # each frame is the [0, 1] source warped by its own field, mapped back to [-1, 1]
    bilinear, nearest = Warp("bilinear", "zeros"), Warp("nearest", "zeros")
    assert torch.allclose(out.frames, 2 * bilinear(((s + 1) / 2).expand(3, -1, -1, -1, -1), out.fields) - 1)
    assert torch.equal(out.labels, nearest(labels.float().expand(3, -1, -1, -1, -1), out.fields).long())
    assert out.fields.abs().max() > 1.0  # the fields really move voxels ...
    assert (out.labels != labels).any()  # ... and labels with them, staying source labels
    assert set(out.labels.unique().tolist()) <= set(labels.unique().tolist())
    assert out.frames.min() >= -1 - 1e-6 and out.frames.max() <= 1 + 1e-6
    # frames do not depend on which other gammas were asked for
    single = ddm.interpolate(model, s[0, 0], t[0, 0], [0.5], config=config)
    assert torch.allclose(single.frames[0], out.frames[1], atol=1e-6) and single.labels is None


def test_interpolate_progress_cancel_and_defaults(moving):
    model, config = moving
    s, t = pair()
    events = []
    out = ddm.interpolate(model, s, t, config=config, progress=events.append)
    assert len(out.gammas) == config["num_frames"] and torch.equal(out.gammas, torch.linspace(0, 1, 8))
    assert len(events) == config["num_frames"] + 1
    assert [e.step for e in events] == list(range(9)) and {e.stage for e in events} == {"interpolate"}

    token, seen, calls = CancelToken(), [], []
    hook = model.field_fn.register_forward_hook(lambda *args: calls.append(1))

    def on_progress(event):
        seen.append(event.step)
        if event.step == 2:
            token.cancel()

    try:
        with pytest.raises(Cancelled):
            ddm.interpolate(model, s, t, [0.0, 0.25, 0.5, 0.75, 1.0], config=config, progress=on_progress, cancel=token)
    finally:
        hook.remove()
    assert seen == [0, 1, 2] and len(calls) == 2  # stopped right after the 2nd frame


def test_interpolate_rejects_bad_inputs(tiny):
    model, config = tiny
    s, t = pair()
    with pytest.raises(InputError, match="differs"):
        ddm.interpolate(model, s, torch.zeros(1, 1, 16, 16, 32), [1.0], config=config)
    with pytest.raises(InputError, match="multiple of 16"):
        ddm.interpolate(model, s[..., :12], t[..., :12], [1.0], config=config)
    with pytest.raises(InputError, match="integer labels"):
        ddm.interpolate(model, s, t, [1.0], config=config, source_labels=s)
    with pytest.raises(InputError, match="gammas"):
        ddm.interpolate(model, s, t, [float("nan")], config=config)


# -- upstream checkpoints ------------------------------------------------------------------------------
def test_key_rules_give_upstream_names_both_ways():
    model = ddm.build(ddm.default_config("paper"))
    ours = model.state_dict()
    upstream = {ddm.key_to_upstream(k): tuple(v.shape) for k, v in ours.items()}
    assert len(upstream) == len(ours) == UPSTREAM_PAPER_TENSORS
    for key, shape in UPSTREAM_PAPER_KEYS.items():
        assert upstream.get(key) == shape, key
    assert all(ddm.upstream_to_key(ddm.key_to_upstream(k)) == k for k in ours)


def _schedule_buffers(config: dict) -> dict[str, torch.Tensor]:
    betas = torch.linspace(config["schedule"]["beta_start"], config["schedule"]["beta_end"], 100)
    abar = torch.cumprod(1 - betas, 0)
    return {"betas": betas, "alphas_cumprod": abar, "sqrt_alphas_cumprod": abar.sqrt()}


def _upstream_state(model: ddm.DDM, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    ours = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    upstream = {ddm.key_to_upstream(k): v for k, v in ours.items()}
    upstream["denoise_fn.time_mlp.0.inv_freq"] = torch.tensor([1.0, 0.01])
    return ours, upstream


def test_import_upstream_checkpoint_round_trip(tiny, tmp_path):
    model, config = tiny
    ours, upstream = _upstream_state(model)
    path = tmp_path / "I72000_E800_gen_G.pth"
    torch.save({**upstream, **_schedule_buffers(config)}, path)
    imported, report = ddm.import_upstream_checkpoint(path, config)
    loaded = imported.state_dict()
    assert loaded.keys() == ours.keys()
    assert all(torch.equal(loaded[k], ours[k]) for k in ours)
    assert report["loaded"] == len(ours) and report["dropped"] == ["denoise_fn.time_mlp.0.inv_freq"]
    assert report["renamed"]["denoise_fn.final_conv.block.3.weight"] == "denoise_fn.final_conv.conv.weight"
    assert report["schedule"]["matches_config"] is True and report["schedule"]["num_steps"] == 100
    assert report["ignored"] == []


def test_import_reports_schedule_mismatch_and_names_bad_keys(tiny, tmp_path):
    model, config = tiny
    _, upstream = _upstream_state(model, seed=1)
    path = tmp_path / "ckpt.pth"
    torch.save({**upstream, "betas": torch.linspace(1e-4, 0.02, 1000), "step": torch.tensor(5)}, path)
    _, report = ddm.import_upstream_checkpoint(path, config)
    assert report["schedule"]["matches_config"] is False and report["schedule"]["num_steps"] == 1000
    assert report["ignored"] == ["step"]

    broken = dict(upstream)
    del broken["field_fn.keepblock.block.0.weight"]
    broken["denoise_fn.mid.0.attn.qkv.weight"] = torch.zeros(3, 3, 1, 1, 1)
    broken["denoise_fn.spare.weight"] = torch.zeros(1)
    torch.save(broken, path)
    with pytest.raises(InputError) as err:
        ddm.import_upstream_checkpoint(path, config)
    message = str(err.value)
    assert "missing: field_fn.keepblock.conv.weight (upstream field_fn.keepblock.block.0.weight)" in message
    assert "unexpected: denoise_fn.spare.weight" in message
    assert "mis-shaped (file vs model): denoise_fn.mid.0.attn.qkv.weight (3, 3, 1, 1, 1)" in message
    assert err.value.source == str(path)

    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        ddm.import_upstream_checkpoint(path, config)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(InputError, match="not a state dict"):
        ddm.import_upstream_checkpoint(path, config)
