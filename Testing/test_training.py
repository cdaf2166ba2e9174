"""The training entry point (training/train.py): every method trains on a tiny simulated cohort,
learns, resumes exactly, exports a model the catalog loads, and trains as two processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the training package sits next to the library, not inside it
    sys.path.insert(0, str(ROOT))

from LongitudinalDiffusionLib import catalog
from LongitudinalDiffusionLib.demo.cohort import CohortSpec, write_cohort
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.models import METHODS, default_config, default_grid
from training import train as tt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 subjects x 7 sessions x 4 contrasts at 10 mm, and 2 beating hearts of 4 frames."""
    spec = CohortSpec(n_subjects=3, seed=0, shape=(16, 20, 16), spacing=(10.0, 10.0, 10.0), lesion_probability=0.0,
                      heart=True, n_hearts=2, heart_frames=4)  # fmt: skip
    return write_cohort(tmp_path_factory.mktemp("data") / "cohort", spec)


def tiny(method: str, root: Path, model: dict | None = None, **train) -> dict:
    """A raw config at the library's "tiny" scale: 4 steps (Cas-DiffCom: 2 per stage), one
    held-out subject (or heart), validation and checkpoints every 2 steps."""
    settings = {"steps": 4, "lr": 1e-3, "val_every": 2, "ckpt_every": 2, "log_every": 1, "val_cases": 2}
    raw = {
        "method": method,
        "scale": "tiny",
        "model": model or {},
        "data": {"root": str(root), "n_val": 1},
        "train": {**settings, "val_sampler_steps": 2, **train},
    }
    if method == "cas-diffcom" and "stages" not in train:
        raw["train"]["stages"] = [{"name": "generator", "steps": 2}, {"name": "refiner", "steps": 2}]
    return raw


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- every method

#: every method, and the tissue model for the heart as well as the brain
CASES = [(m, {}) for m in METHODS] + [("tissue-seg", {"anatomy": "heart"})]
CASE_IDS = [m + "".join(f"-{v}" for v in o.values()) for m, o in CASES]


def good_scores(record: dict, method: str) -> bool:
    if method == "tissue-seg":
        return 0 <= record["dice"] <= 1
    return math.isfinite(record["psnr"]) and -1 <= record["ssim"] <= 1


@pytest.mark.parametrize("method, model", CASES, ids=CASE_IDS)
def test_every_method_trains_validates_and_exports_a_model_the_catalog_loads(method, model, cohort, tmp_path):
    run = tmp_path / "run"
    result = tt.Trainer(tt.resolve_config(tiny(method, cohort, model)), run, device="cpu", progress=False).run()
    assert (result.stopped, result.step) == ("completed", 4)

    logged = records(run)
    losses = [r["loss"] for r in logged if r["kind"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    scores = [r for r in logged if r["kind"].startswith("val")]
    assert scores and all(good_scores(r, method) and math.isfinite(r["loss"]) for r in scores)
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert json.loads((run / "config.json").read_text())["method"] == method

    loaded = catalog.load_model(result.export)
    card = loaded.card.card
    config = tt.model_config(method, "tiny", model)
    hearts = method == "ddm" or model.get("anatomy") == "heart"
    assert card["method"] == method and card["config"] == config
    assert card["grid"] == default_grid(method, config)
    assert card["trained_on"]["simulated"] is True and card["trained_on"]["subjects"] == (1 if hearts else 2)
    assert card["training"]["steps"] == 4 and card["training"]["stopped"] == "completed"
    if method == "cas-diffcom":
        assert card["sr_grid"]["shape"] == [16, 16, 16]
        assert set(card["metrics"]) >= {"generator", "refiner"}
        assert all(good_scores(card["metrics"][s], method) for s in ("generator", "refiner"))
    else:
        assert good_scores(card["metrics"], method)
        # the card shows the scores of the last validation, as logged (not a bound any number meets)
        keys = ("dice",) if method == "tissue-seg" else ("psnr", "ssim")
        assert {k: card["metrics"][k] for k in keys} == {k: scores[-1][k] for k in keys}
    if hearts:
        assert card["modalities"] == [] and card["age_range_months"] is None
    else:
        low, high = card["age_range_months"]
        assert 0 <= low < high <= 24 and card["modalities"]

    # the exported weights are the EMA of the checkpoint, not the last raw weights
    ckpt = tt.read_checkpoint(result.checkpoint)
    exported = loaded.network.state_dict()
    assert all(torch.equal(exported[k], ckpt["ema"][k]) for k in exported)
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in exported)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_loss_on_a_fixed_batch_decreases_and_every_trained_parameter_learns(method, cohort, tmp_path):
    config = tt.resolve_config(tiny(method, cohort))
    trainer = tt.Trainer(config, tmp_path / "run", device="cpu", progress=False)
    for stage in trainer.stages:
        trainer.enter_stage(stage)
        items = trainer.dataset(stage)
        batch = trainer.collate([items[0], items[len(items) // 2]], stage)
        frozen = {k: v.clone() for k, v in trainer.model.named_parameters() if not v.requires_grad}
        before = trainer.loss_on(batch, seed=3)
        for _ in range(6):
            assert math.isfinite(trainer.train_step(batch)["loss"])
        assert trainer.loss_on(batch, seed=3) < before, stage.label
        # no parameter of the stage is left out of the loss (so DDP needs no unused-parameter search) ...
        trained = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        assert trained and [n for n, p in trained if p.grad is None] == []
        # ... and the other stage is left as it was
        assert all(torch.equal(v, dict(trainer.model.named_parameters())[k]) for k, v in frozen.items())
    if method == "cas-diffcom":
        assert [s.name for s in trainer.stages] == ["generator", "refiner"]


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", ["cas-diffcom", "sadm"])
def test_a_resumed_run_continues_bitwise_as_if_never_stopped(method, cohort, tmp_path):
    raw = tiny(method, cohort, steps=5, val_every=0, ckpt_every=2)
    if method == "cas-diffcom":
        raw["train"]["stages"] = [{"name": "generator", "steps": 2}, {"name": "refiner", "steps": 3}]
    straight = tt.Trainer(tt.resolve_config(raw), tmp_path / "a", device="cpu", progress=False).run()

    if method == "sadm":  # 2 training timelines: step 3 is mid-epoch; items read by 2 loader workers
        raw["data"]["workers"] = 2
    config = tt.resolve_config(raw)
    first = tt.Trainer(config, tmp_path / "b", device="cpu", progress=False).run(until=3)
    assert (first.stopped, first.step, first.export) == ("until", 3, None)
    if method == "cas-diffcom":  # the run died after step 3, before its checkpoint: back to step 2
        tt.checkpoints(tmp_path / "b")[-1].unlink()
    with pytest.raises(LongitudinalDiffusionError, match="--resume"):
        tt.Trainer(config, tmp_path / "b", device="cpu", progress=False)
    resumed = tt.Trainer(config, tmp_path / "b", device="cpu", progress=False, resume=True)
    assert resumed.step == (2 if method == "cas-diffcom" else 3)
    second = resumed.run()
    assert second.step == straight.step == 5

    a, b = tt.read_checkpoint(straight.checkpoint), tt.read_checkpoint(second.checkpoint)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["ema_updates"] == b["ema_updates"] == 5
    assert torch.equal(a["rng"][0]["loss"], b["rng"][0]["loss"])
    # the log holds each step once: what was logged after the checkpoint resumed from is gone
    losses = [[r["loss"] for r in records(run) if r["kind"] == "train"] for run in (tmp_path / "a", tmp_path / "b")]
    assert len(losses[0]) == 5 and losses[0] == losses[1]
    exported = [catalog.load_model(r.export) for r in (straight, second)]
    weights = [m.network.state_dict() for m in exported]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert exported[0].card.card["metrics"] == exported[1].card.card["metrics"]


def test_a_termination_signal_stops_at_the_end_of_the_step_with_a_checkpoint(cohort, tmp_path):
    config = tt.resolve_config(tiny("interval", cohort, val_every=0, ckpt_every=0))
    trainer = tt.Trainer(config, tmp_path / "run", device="cpu", progress=False)
    step, before = trainer.train_step, signal.getsignal(signal.SIGTERM)

    def step_and_get_terminated(batch):  # the job is pre-empted during the second step
        out = step(batch)
        if trainer.step == 1:
            signal.raise_signal(signal.SIGTERM)
        return out

    trainer.train_step = step_and_get_terminated
    result = trainer.run()
    assert (result.stopped, result.step, result.export) == ("interrupted", 2, None)
    assert [p.name for p in tt.checkpoints(tmp_path / "run")] == ["step-00000002.pt"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are given back
    again = tt.Trainer(config, tmp_path / "run", device="cpu", progress=False, resume=True).run()
    assert (again.stopped, again.step) == ("completed", 4) and again.export is not None


# ----------------------------------------------------------------------------- the command line


def test_the_command_line_stops_on_its_time_budget_and_still_exports(cohort, tmp_path, capsys):
    path = tmp_path / "ddm-tiny.json"
    path.write_text(json.dumps(tiny("ddm", cohort, steps=1000)))
    argv = ["--config", str(path), "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"]
    assert tt.main([*argv, "--time-budget", "0", "--export", str(tmp_path / "models")]) == 0
    card = json.loads((tmp_path / "models" / "ddm-tiny.json").read_text())
    assert card["training"]["stopped"] == "time budget" and card["training"]["steps"] == 1
    assert catalog.load_model(tmp_path / "models" / "ddm-tiny.json").method == "ddm"
    # the same run folder again without --resume: refused, with the way out in the message
    assert tt.main(argv) == 2
    assert "--resume" in capsys.readouterr().err


def test_bad_configs_are_refused_with_the_reason(cohort, tmp_path, capsys):
    with pytest.raises(InputError, match=r"unknown key\(s\) in train: stepz"):
        tt.resolve_config({**tiny("interval", cohort), "train": {"stepz": 3}})
    with pytest.raises(InputError, match="unknown or missing method 'gan'"):
        tt.resolve_config({**tiny("interval", cohort), "method": "gan"})
    with pytest.raises(InputError, match="unknown stage 'decoder'"):
        tt.resolve_config(tiny("cas-diffcom", cohort, stages=["generator", "decoder"]))
    with pytest.raises(InputError, match="one stage"):
        tt.resolve_config(tiny("interval", cohort, stages=["generator"]))
    with pytest.raises(InputError, match="train.lr must be"):
        tt.resolve_config(tiny("interval", cohort, lr=-1))
    with pytest.raises(InputError, match="config is for method 'sadm'"):
        tt.resolve_config(tiny("sadm", cohort), method="cwdm")
    no_data = tt.resolve_config({**tiny("interval", cohort), "data": {}})
    with pytest.raises(InputError, match="no dataset"):
        tt.Trainer(no_data, tmp_path / "run", device="cpu")
    # arguments of a method's default config pass through it, and what follows from them follows
    cwdm = tt.resolve_config(tiny("cwdm", cohort, {"target": "FLAIR"}))["model"]
    assert cwdm["target"] == "FLAIR" and cwdm["conditions"] == ["T1w", "T1ce", "T2w"]
    heart = tt.resolve_config(tiny("tissue-seg", cohort, {"anatomy": "heart"}))["model"]
    assert heart["classes"] == ["background", "blood pool", "myocardium"]
    assert tt.main(["--method", "sadm", "--config", str(tmp_path / "missing.json")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_every_method_has_a_demo_and_a_paper_config():
    for method in METHODS:
        for scale in ("demo", "paper"):
            config, path = tt.load_config(scale, method)
            assert path == tt.CONFIG_DIR / f"{method}-{scale}.json"
            assert (config["method"], config["scale"]) == (method, scale)
            assert config["export"]["name"] and config["train"]["steps"] >= 1
            if scale == "paper":  # the published architecture and schedule, unchanged
                published = default_config(method, "paper")
                assert {k: config["model"][k] for k in published} == published
    # beyond a demo and a paper config per method, only named variants of a demo config
    # (e.g. ddm-demo-2mm), each resolving to a valid run of its method
    variants = sorted(set(tt.CONFIG_DIR.glob("*.json")) - {tt.CONFIG_DIR / f"{m}-{s}.json" for m in METHODS
                                                            for s in ("demo", "paper")})  # fmt: skip
    assert [v.name for v in variants] == ["ddm-demo-2mm.json", "sadm-demo-4mm.json"]
    for path in variants:
        config = tt.resolve_config(json.loads(path.read_text()), path)
        assert config["scale"] == "demo" and path.name.startswith(f"{config['method']}-demo-")


# ----------------------------------------------------------------------------- two processes


def test_two_cpu_processes_train_one_model_with_gloo(cohort, tmp_path):
    path = tmp_path / "interval-tiny.json"
    path.write_text(json.dumps(tiny("interval", cohort, steps=3, val_every=0, ckpt_every=0, val_cases=2)))
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launch, "-m", "training.train", "--config", str(path), "--out", str(run), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    saved = tt.checkpoints(run)
    assert len(saved) == 1  # one writer
    ckpt = tt.read_checkpoint(saved[0])
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3
    assert len(ckpt["fingerprints"]) == 2 and len(set(ckpt["fingerprints"])) == 1  # identical replicas
    assert not torch.equal(ckpt["rng"][0]["loss"], ckpt["rng"][1]["loss"])  # each process its own noise
    card = catalog.load_model(run / "model" / "interval-tiny.json").card.card
    assert card["training"]["processes"] == 2 and card["metrics"]["cases"] == 2


def test_training_pairs_can_be_limited_to_nearby_visits(cohort):
    """``model.training_pairs.max_visit_gap`` k keeps the ordered pairs at most k visits apart
    (a two-sided completion only asks for those); without it every ordered pair is used."""
    from training.data import make_dataset, open_cohort

    data = open_cohort(cohort)
    ids = data.subjects[:1]
    config = default_config("cas-diffcom", "tiny")
    n = len(make_dataset("interval", default_config("interval", "tiny"), None, data, ids, train=False).recipes)
    visits = round((1 + math.sqrt(1 + 4 * n)) / 2)  # n = v (v - 1) ordered pairs
    assert visits * (visits - 1) == n and visits >= 4
    for gap, expected in ((None, n), (1, 2 * (visits - 1)), (2, 2 * (visits - 1) + 2 * (visits - 2))):
        config["training_pairs"] = {} if gap is None else {"max_visit_gap": gap}
        pairs = make_dataset("cas-diffcom", config, None, data, ids, train=False).recipes
        assert len(pairs) == expected
        order = {id(tp): i for i, tp in enumerate(sorted({id(a): a for a, _ in pairs}.values(), key=lambda t: t.age))}
        assert all(gap is None or abs(order[id(a)] - order[id(b)]) <= gap for a, b in pairs)


# ----------------------------------------------------------------------------- the EMA


class _HandWrittenEMA:
    """The trainer's EMA before it used torch's AveragedModel, kept here as the reference."""

    def __init__(self, model, decay):
        import copy

        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = float(decay), 0

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                ema[name].lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def test_the_ema_gives_the_weights_of_the_hand_written_one_through_warm_up_and_frozen_stages():
    """training.ema.EMA (torch's AveragedModel with the warm-up decay) averages exactly as the
    hand-written EMA did, bitwise: through the warm-up, past it (decay 0.6 is reached at update
    4), with a stage frozen (its average stays), and after a resume from ``updates``."""
    from LongitudinalDiffusionLib import models
    from training.ema import EMA

    torch.manual_seed(0)
    network = models.build("cas-diffcom", default_config("cas-diffcom", "tiny"))
    network.register_buffer("seen", torch.zeros(3))  # a buffer follows the trained network
    new, old = EMA(network, 0.6), _HandWrittenEMA(network, 0.6)
    generator = torch.Generator().manual_seed(1)
    for update in range(8):
        part = network.generator if update < 4 else network.refiner  # the two stages in turn
        network.requires_grad_(False)
        part.requires_grad_(True)
        with torch.no_grad():
            for p in network.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator))
            network.seen.add_(1)
        new.update(network)
        old.update(network)
    assert new.updates == old.updates == 8
    a, b = new.model.state_dict(), old.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["seen"], torch.full((3,), 8.0))
    # the generator's average was not touched in the refiner's stage, and differs from its weights
    g = "generator." + next(n for n, _ in network.generator.named_parameters())
    assert not torch.equal(a[g], network.state_dict()[g])

    resumed = EMA(network, 0.6)  # a resume: the saved average and count, then more updates
    resumed.model.load_state_dict(a)
    resumed.updates = new.updates
    for ema in (new, old, resumed):
        ema.update(network)
    c = resumed.model.state_dict()
    assert all(torch.equal(c[k], old.model.state_dict()[k]) and torch.equal(c[k], new.model.state_dict()[k]) for k in c)


def test_a_checkpoint_keeps_the_version_1_keys_so_older_runs_resume(cohort, tmp_path):
    """The checkpoint holds what the trainer wrote before its EMA became torch's AveragedModel:
    the same keys, the EMA as the network's own state dict (no wrapper prefix, no counter
    buffer) and its update count as ``ema_updates``; a run resumes from exactly that."""
    config = tt.resolve_config(tiny("interval", cohort, steps=3, val_every=0, ckpt_every=2))
    first = tt.Trainer(config, tmp_path / "run", device="cpu", progress=False).run(until=2)
    ckpt = tt.read_checkpoint(first.checkpoint)
    assert set(ckpt) == {"format", "version", "method", "config", "step", "stage", "model", "ema", "ema_updates",
                         "optimizer", "scaler", "rng", "world_size", "fingerprints", "time_s", "metrics"}  # fmt: skip
    assert (ckpt["version"], ckpt["ema_updates"]) == (1, 2) and ckpt["ema"].keys() == ckpt["model"].keys()
    resumed = tt.Trainer(config, tmp_path / "run", device="cpu", progress=False, resume=True)
    assert resumed.ema.updates == 2
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in resumed.ema.model.state_dict().items())
    assert resumed.run().step == 3 and tt.read_checkpoint(resumed.last_checkpoint)["ema_updates"] == 3
