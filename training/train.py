"""Train any method of the library: one entry point, the CPU, one GPU or many.

``python -m training.train --method M --config C`` (``C`` a JSON file, or ``demo`` / ``paper``
for ``training/configs/M-C.json``). The same command under ``torchrun`` trains with
DistributedDataParallel on several GPUs or machines. See ``training/README.md``.

The config (JSON)::

    {"method": "interval", "scale": "demo",
     "model": {...},   # merged into models.default_config(method, scale); may be {}
     "data": {"root": "cohort", "n_val": null, "workers": 0},
     "train": {"steps": 3000, "batch_size": 2, "lr": null, "ema_decay": 0.999, ...},
     "export": {"name": "interval-demo", "folder": null, "description": "...", "trained_on": {}}}

:data:`TRAIN_DEFAULTS`, :data:`DATA_DEFAULTS` and :data:`EXPORT_DEFAULTS` list every key; an
unknown key is an error (a typo must not silently fall back to a default).

Choices:

* **Stages.** A method whose module has ``STAGES`` (Cas-DiffCom: generator, refiner) trains
  them one after the other in one run, as the paper does; each stage has its own step count,
  and may have its own batch size and learning rate (``train.stages``). A stage named like a
  submodule of the network (``model.generator``) trains only that submodule: the rest is
  frozen, so DistributedDataParallel sees no unused parameters and the EMA of the finished
  stage stays as it was. Each stage gets a fresh AdamW.
* **Batches.** ``batch_size`` is per process: ``torchrun`` with ``n`` processes trains on
  ``n * batch_size`` items a step (gradients are averaged). Every epoch is a fixed
  permutation of (seed, stage, epoch) split between the processes (``DistributedSampler``,
  the last incomplete batch dropped); the datasets' own random choices are seeded by
  (seed, item, epoch). The loss's randomness (steps, noise, dropout) comes from a generator
  owned by the trainer, one per process.
* **Resuming** restores the weights, EMA, optimiser, gradient scaler, step, the random
  states (torch, numpy, python and the loss generator, of every process) and the position
  in the epoch, so an interrupted run continues exactly as if it had not stopped (bitwise on
  the CPU; on a GPU up to cuDNN's own non-determinism unless ``train.deterministic``).
* **EMA.** The exported and validated weights are an exponential moving average with
  decay ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates (a warm-up, so that
  short runs are not dominated by the random initial weights): torch's ``AveragedModel``
  with that average (``training/ema.py``).
* **Mixed precision** (float16 autocast and a gradient scaler) on CUDA when ``train.amp``;
  nothing changes on the CPU. Gradients are clipped to ``grad_clip`` (global L2 norm).
* **Validation** every ``val_every`` steps on ``val_cases`` held-out items (the last
  ``n_val`` subjects, or hearts for DDM, in sorted order, as ``training/evaluate.py``
  holds them out): the loss with fixed noise, and the method's own inference with a short
  sampler (DDIM, ``val_sampler_steps`` steps; DDM warps the source fully, gamma 1) scored
  against the item's target with MONAI's PSNR and SSIM over the grid's intensity range
  (the tissue model: its labels against the truth, mean Dice).
* **Stopping.** SIGINT or SIGTERM (a cluster pre-empting the job) ends the run after the
  current step, with a checkpoint and without export; every process stops at the same step.
* **Time budget.** ``time_budget_s`` (or ``--time-budget``) counts the wall-clock time of
  this invocation; training stops early enough to leave time for the final validation
  (as long as the previous one took), then checkpoints and exports as usual.

The rooms: ``config`` (the run config), ``processes`` (the process group, seeds),
``batches`` (the order of the items), ``ema``, ``checkpoints``, ``validation`` (inference
and scores), ``card`` (the model card); this module holds the trainer and the command line,
and re-exports the names other code imports from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from LongitudinalDiffusionLib import catalog, models
from LongitudinalDiffusionLib.diffusion import autocast
from LongitudinalDiffusionLib.errors import InputError, LongitudinalDiffusionError
from LongitudinalDiffusionLib.imaging import atomic_write, write_json

from . import data as tdata
from .batches import EpochItems, EpochStream
from .card import model_card
from .checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    checkpoints,
    fingerprint,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from .config import (
    CONFIG_DIR,
    DATA_DEFAULTS,
    EXPORT_DEFAULTS,
    STAGE_KEYS,
    TOP_KEYS,
    TRAIN_DEFAULTS,
    load_config,
    model_config,
    resolve_config,
)
from .ema import EMA
from .processes import Processes, derived_seed, start_processes
from .validation import PREDICTORS, SCORERS, image_scores, label_scores

#: the names other code imports from here (they live in the modules above)
__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CONFIG_DIR",
    "DATA_DEFAULTS",
    "EMA",
    "EXPORT_DEFAULTS",
    "PREDICTORS",
    "SCORERS",
    "STAGE_KEYS",
    "TOP_KEYS",
    "TRAIN_DEFAULTS",
    "Processes",
    "RunResult",
    "Stage",
    "Trainer",
    "build_parser",
    "checkpoints",
    "fingerprint",
    "image_scores",
    "label_scores",
    "load_config",
    "main",
    "model_config",
    "read_checkpoint",
    "resolve_config",
    "start_processes",
]

log = logging.getLogger("longdiff.training")


# ============================================================================ the trainer


class _LossModule(nn.Module):
    """The method's loss as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module, loss: Callable, config: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self._loss = loss
        self._config = config

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        return self._loss(self.model, batch, self._config, generator=generator)


@dataclass
class Stage:
    index: int
    name: str | None
    start: int  # global step at which it begins
    steps: int
    batch_size: int
    lr: float

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def label(self) -> str:
        """The stage's name; "model" for a method trained in one stage."""
        return self.name or "model"

    @property
    def tag(self) -> str:
        """Where its validation is logged: ``val`` or ``val/<stage>``."""
        return f"val/{self.name}" if self.name else "val"


@dataclass
class RunResult:
    step: int
    stopped: str  # "completed", "time budget", "until", "interrupted"
    metrics: dict[str, Any]
    checkpoint: Path | None
    export: Path | None


class Trainer:
    """Trains one method from a resolved config (:func:`resolve_config`) into ``run_dir``.

    Args:
        config: the resolved run config.
        run_dir: checkpoints, ``config.json``, ``metrics.jsonl`` and ``tensorboard/`` go here.
        device: ``auto``, ``cpu``, ``cuda`` (under ``torchrun`` each process takes its GPU).
        resume: continue from the newest checkpoint in ``run_dir`` (start afresh if none).
        export_dir: where the model is exported (default: the config's, else ``run_dir/model``).
        config_file: the config's path, recorded in the model card.
        progress: show a progress bar (main process, interactive terminals).
    """

    def __init__(
        self,
        config: dict[str, Any],
        run_dir: str | os.PathLike,
        *,
        device: str = "auto",
        resume: bool = False,
        export_dir: str | os.PathLike | None = None,
        config_file: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.method = config["method"]
        self.mcfg = config["model"]
        self.tcfg = config["train"]
        self.run_dir = Path(run_dir)
        self.config_file = None if config_file is None else Path(config_file)
        self.progress = progress
        self.procs = start_processes(device)
        self.device = self.procs.device
        self.export_dir = Path(export_dir) if export_dir else None
        self.started = time.monotonic()
        if self.procs.main and config["export"]["enabled"]:
            # before any data or training: the export must not replace a card or weights longdiff did not write
            catalog.check_model_target(self._export_folder(), config["export"]["name"])

        existing = self._agreed_checkpoints()
        if existing and not resume:
            raise LongitudinalDiffusionError(
                f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, or choose another --out"
            )
        if self.tcfg["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

        seed, rank = self.tcfg["seed"], self.procs.rank
        torch.manual_seed(seed)  # the same initial weights in every process
        try:
            self.model = models.build(self.method, self.mcfg).to(self.device)
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"cannot build a {self.method} network from the model config ({exc})"
            raise InputError(config_file or "config", problem) from exc
        if self.tcfg["init_from"] and not existing:
            self._init_from(self.tcfg["init_from"])
        self.ema = EMA(self.model, self.tcfg["ema_decay"])
        self.loss_fn = models.method_module(self.method).loss
        torch.manual_seed(derived_seed(seed, rank, 1))
        np.random.seed(derived_seed(seed, rank, 2) % 2**32)
        random.seed(derived_seed(seed, rank, 3))
        self.loss_generator = torch.Generator().manual_seed(derived_seed(seed, rank, 4))
        self.amp = bool(self.tcfg["amp"]) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)

        self.stages: list[Stage] = []
        start = 0
        for i, s in enumerate(self.tcfg["stages"]):
            self.stages.append(Stage(i, s["name"], start, s["steps"], s["batch_size"], s["lr"]))
            start += s["steps"]
        self.total_steps = start
        self.step = 0
        self.time_s = 0.0  # training time of earlier invocations of this run
        self.metrics: dict[str, Any] = {}
        self._stage: Stage | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._train_module: nn.Module | None = None
        self._datasets: dict[tuple[str | None, bool], Any] = {}
        self._writer: Any = None  # a SummaryWriter once opened; False without tensorboard
        self._last_val_s = 0.0
        self.last_checkpoint: Path | None = None
        self._resumed_at: int | None = None
        self._signal: str | None = None
        self._open_data()
        if existing:
            self._restore(read_checkpoint(existing[-1]), existing[-1])

    def _init_from(self, name: str) -> None:
        """Start from the weights of catalog model ``name`` (loaded like any model: sha256,
        safetensors, architecture checked against this run's config)."""
        loaded = catalog.load_model(name, device="cpu")
        if loaded.method != self.method:
            raise InputError(name, f"train.init_from is a {loaded.method} model, not {self.method}")
        state = loaded.network.state_dict()
        adapt = getattr(models.method_module(self.method), "adapt_state", None)
        if adapt is not None:  # e.g. SADM's patch positions on another grid
            state = adapt(self.model, loaded.network, state)
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exc:
            raise InputError(name, f"train.init_from does not fit this run's network ({exc})") from exc
        log.info("initial weights from %s (sha256 %s)", name, loaded.card.card["weights"]["sha256"][:12])

    def _agreed_checkpoints(self) -> list[Path]:
        """The main process's list of checkpoints, which every process must be able to read
        (the run folder has to be on storage all machines share)."""
        found = self.procs.broadcast([p.name for p in checkpoints(self.run_dir)])
        paths = [self.run_dir / "checkpoints" / name for name in found]
        missing = self.procs.sum([float(bool(paths) and not paths[-1].is_file())])[0]
        if missing:
            raise LongitudinalDiffusionError(
                f"{int(missing)} process(es) cannot see {paths[-1]}: put the run folder (--out) on storage "
                "that every machine shares"
            )
        return paths

    # ------------------------------------------------------------------ data
    def _open_data(self) -> None:
        root = self.config["data"]["root"]
        if not root:
            raise InputError(None, "no dataset: set data.root in the config or pass --data DIR")
        self.cohort = tdata.open_cohort(root)
        ids = tdata.ids_for(self.method, self.mcfg, self.cohort)
        self.hearts = set(ids) <= set(self.cohort.hearts)  # DDM and a heart segmentation model
        n_val = self.config["data"]["n_val"] or (1 if self.hearts else 2)
        self.train_ids, self.val_ids = tdata.split(ids, n_val)
        # a test id that the run trains or validates on stops it here, before any training
        tdata.card_splits(self.cohort, self.train_ids, self.val_ids, self.config["data"]["test"], dataset="")
        self.grid = models.default_grid(self.method, self.mcfg)

    def dataset(self, stage: Stage | None = None, *, train: bool = True):
        """The training (or held-out) dataset of a stage, built once."""
        stage = stage or self.stages[0]
        key = (stage.name, train)
        if key not in self._datasets:
            ids = self.train_ids if train else self.val_ids
            self._datasets[key] = tdata.make_dataset(
                self.method, self.mcfg, self.grid, self.cohort, ids,
                train=train, seed=self.tcfg["seed"], stage=stage.name,
            )  # fmt: skip
            if train and len(self._datasets[key]) < stage.batch_size * self.procs.world:
                raise InputError(
                    self.cohort.root,
                    f"{len(self._datasets[key])} training items for {self.method} ({stage.label}) are fewer than "
                    f"batch_size x processes = {stage.batch_size * self.procs.world}",
                )
        return self._datasets[key]

    def collate(self, items: list[dict[str, torch.Tensor]], stage: Stage | None = None) -> dict[str, Any]:
        """Items -> a batch on the device, with the stage name the loss expects."""
        batch = torch.utils.data.default_collate(items)
        return self._to_device(batch, stage or self.stages[0])

    def _to_device(self, batch: dict[str, Any], stage: Stage) -> dict[str, Any]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if stage.name is not None:
            batch["stage"] = stage.name
        return batch

    def _batches(self, stage: Stage) -> Iterator[dict[str, Any]]:
        """The stage's batches from the current step on, without end: epochs of a fixed
        permutation of (seed, stage, epoch), split between the processes. One loader serves the
        whole stage, so its workers (and the grid cache they fill) live as long as it."""
        dataset = self.dataset(stage)
        sampler: DistributedSampler[int] = DistributedSampler(
            dataset, num_replicas=self.procs.world, rank=self.procs.rank, shuffle=True,
            seed=derived_seed(self.tcfg["seed"], stage.index, 5) % 2**31, drop_last=True,
        )  # fmt: skip
        epoch, offset = divmod(self.step - stage.start, len(sampler) // stage.batch_size)
        workers = self.config["data"]["workers"]
        loader = DataLoader(
            EpochItems(dataset), batch_size=stage.batch_size, drop_last=True, num_workers=workers,
            sampler=EpochStream(sampler, stage.batch_size, epoch, offset),
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(derived_seed(self.tcfg["seed"], stage.index, epoch, offset, 6)),
        )  # fmt: skip
        for batch in loader:
            yield self._to_device(batch, stage)

    # ------------------------------------------------------------------ stages and steps
    def enter_stage(self, stage: Stage) -> None:
        """Freeze everything outside the stage's submodule; a fresh AdamW; DDP if distributed."""
        self._stage = stage
        part = getattr(self.model, stage.name, None) if stage.name else None
        part = part if isinstance(part, nn.Module) else self.model
        self.model.requires_grad_(False)
        part.requires_grad_(True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=stage.lr, betas=tuple(self.tcfg["betas"]), weight_decay=self.tcfg["weight_decay"]
        )
        module: nn.Module = _LossModule(self.model, self.loss_fn, self.mcfg)
        if self.procs.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self._train_module = module

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimiser step on ``batch``; returns this process's loss and the gradient norm."""
        if self._stage is None:
            self.enter_stage(self.stages[0])
        module, optimizer = self._train_module, self.optimizer
        assert module is not None and optimizer is not None  # set by enter_stage
        module.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            loss = module(batch, self.loss_generator)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        limit = self.tcfg["grad_clip"] if self.tcfg["grad_clip"] else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
        self.scaler.step(optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def loss_on(self, batch: dict[str, Any], seed: int = 0, model: nn.Module | None = None) -> float:
        """The loss of ``model`` (default: the trained network) on ``batch`` with fixed noise."""
        model = model or self.model
        was = model.training
        model.eval()
        try:
            with autocast(self.device, self.amp):
                return float(self.loss_fn(model, batch, self.mcfg, generator=torch.Generator().manual_seed(seed)))
        finally:
            model.train(was)

    # ------------------------------------------------------------------ validation
    def validate(self, stage: Stage) -> dict[str, float]:
        """Held-out loss, PSNR and SSIM of the EMA network on ``val_cases`` items (split
        between the processes; the sums are combined)."""
        t0 = time.monotonic()
        dataset = self.dataset(stage, train=False)
        n = min(self.tcfg["val_cases"], len(dataset))
        picks = sorted({int(round(i)) for i in np.linspace(0, len(dataset) - 1, n)})
        predict = PREDICTORS.get(self.method)
        score = SCORERS.get(self.method, image_scores)
        sums: dict[str, float] = {"cases": 0.0, "loss": 0.0}
        for case, index in enumerate(picks):
            if case % self.procs.world != self.procs.rank:
                continue
            batch = self.collate([dataset[index]], stage)
            sums["loss"] += self.loss_on(batch, seed=derived_seed(self.tcfg["seed"], index, 7), model=self.ema.model)
            if predict is not None:
                with torch.no_grad():
                    generator = torch.Generator().manual_seed(derived_seed(self.tcfg["seed"], index, 8))
                    pred, truth = predict(self.ema.model, {**batch, "case": case}, self.mcfg,
                                          self.tcfg["val_sampler_steps"], generator)  # fmt: skip
                for key, value in score(pred, truth, self.grid, self.mcfg).items():
                    sums[key] = sums.get(key, 0.0) + value
            sums["cases"] += 1
        keys = list(sums) if self.procs.main else None
        keys = self.procs.broadcast(keys)  # a process without a case has only loss and cases
        totals = dict(zip(keys, self.procs.sum([sums.get(k, 0.0) for k in keys])))
        self._last_val_s = time.monotonic() - t0
        cases = totals.pop("cases")
        return {"cases": int(cases), **{k: v / cases for k, v in totals.items()}}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-NNNNNNNN.pt`` atomically (main process), keeping the newest
        ``keep_checkpoints``. Every process takes part: their random states and a fingerprint of
        their weights are gathered, and differing replicas are an error."""
        rng = self.procs.gather(rng_state(self.loss_generator))
        prints = self.procs.gather(fingerprint(self.model))
        if len(set(prints)) > 1:
            raise LongitudinalDiffusionError(f"the {self.procs.world} processes hold different weights at step "
                                             f"{self.step}: the replicas diverged")  # fmt: skip
        path = self.run_dir / "checkpoints" / f"step-{self.step:08d}.pt"
        if self.procs.main:
            stage = self._stage or self.stages[0]
            state = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "method": self.method,
                "config": self.config,
                "step": self.step,
                "stage": stage.index,
                "model": self.model.state_dict(),
                "ema": self.ema.model.state_dict(),
                "ema_updates": self.ema.updates,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "world_size": self.procs.world,
                "fingerprints": prints,
                "time_s": self.elapsed(),
                "metrics": self.metrics,
            }
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            for old in checkpoints(self.run_dir)[: -self.tcfg["keep_checkpoints"]]:
                old.unlink(missing_ok=True)
        self.procs.barrier()
        self.last_checkpoint = path
        return path

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        if ckpt["method"] != self.method or ckpt["config"]["model"] != self.mcfg:
            raise InputError(path, "the checkpoint's method or model config differs from this run's config")
        before = {k: ckpt["config"]["train"].get(k) for k in ("batch_size", "seed", "stages")}
        now = {k: self.tcfg.get(k) for k in before}
        for key in before:
            if key != "stages" and before[key] != now[key]:
                log.warning("resuming with train.%s = %s (the run began with %s)", key, now[key], before[key])
        self.model.load_state_dict(ckpt["model"])
        self.ema.model.load_state_dict(ckpt["ema"])
        self.ema.updates = int(ckpt["ema_updates"])
        self.step = int(ckpt["step"])
        self._resumed_at = self.step + 1
        self.time_s = float(ckpt["time_s"])
        self.metrics = dict(ckpt.get("metrics") or {})
        stage = self._stage_at(self.step)
        self.enter_stage(stage)
        if ckpt["optimizer"] is not None and int(ckpt["stage"]) == stage.index and self.optimizer is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and self.amp:
            self.scaler.load_state_dict(ckpt["scaler"])
        if int(ckpt["world_size"]) == self.procs.world:
            set_rng_state(ckpt["rng"][self.procs.rank], self.loss_generator)
        else:
            log.warning(
                "the checkpoint was written by %s processes, this run has %s: the noise and data order continue "
                "differently from an uninterrupted run", ckpt["world_size"], self.procs.world,
            )  # fmt: skip
            self.loss_generator.manual_seed(derived_seed(self.tcfg["seed"], self.procs.rank, self.step, 4))
        if self.procs.main:
            log.info("resumed from %s at step %d of %d", path, self.step, self.total_steps)
            lines = self.run_dir / "metrics.jsonl"  # forget what was logged after the checkpoint
            if lines.is_file():
                text = lines.read_text(encoding="utf-8")
                kept = "".join(ln + "\n" for ln in text.splitlines() if json.loads(ln)["step"] <= self.step)
                atomic_write(lines, lambda tmp: Path(tmp).write_text(kept, encoding="utf-8"))

    def _stage_at(self, step: int) -> Stage:
        for stage in self.stages:
            if step < stage.end:
                return stage
        return self.stages[-1]

    def elapsed(self) -> float:
        return self.time_s + (time.monotonic() - self.started)

    # ------------------------------------------------------------------ logs
    def _record(self, kind: str, payload: dict[str, Any]) -> None:
        if not self.procs.main:
            return
        line = {"kind": kind, "step": self.step, "time_s": round(self.elapsed(), 3), **payload}
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional dependency of training
                self._writer = False
                log.warning("tensorboard is not installed (pip install tensorboard): logging to metrics.jsonl only")
            else:  # events after the step resumed from are dropped (purge_step)
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._resumed_at)
        if self._writer:
            for key, value in payload.items():
                if isinstance(value, (int, float)) and key != "cases":
                    self._writer.add_scalar(f"{kind}/{key}", value, self.step)
            self._writer.flush()

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:  # the second one: stop at once (the last checkpoint stands)
            raise KeyboardInterrupt
        self._signal = signal.Signals(signum).name
        log.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)", self._signal)

    def _catch_signals(self) -> dict[int, Any]:
        """SIGINT and SIGTERM (Ctrl-C, a cluster pre-empting the job) stop the run at the end of
        the current step, with a checkpoint to resume from; the processes agree on it."""
        previous: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return previous

    def run(self, until: int | None = None) -> RunResult:
        """Train to the end of the last stage (or to step ``until``, or until the time budget
        is spent), validating, logging and checkpointing on the way; then validate every
        stage, checkpoint and export (unless stopped by ``until``)."""
        from tqdm.auto import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.procs.main:
            write_json(self.run_dir / "config.json", self.config)
        until = self.total_steps if until is None else min(until, self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=None if (self.progress and self.procs.main) else True)  # fmt: skip
        handlers = self._catch_signals()
        try:
            stopped = self._train_stages(until, bar)
        finally:
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if self.step < self.total_steps and stopped == "completed":
            stopped = "until"
        return self._finish(stopped)

    def _train_stages(self, until: int, bar: Any) -> str:
        """Train stage after stage up to step ``until``: "completed" when there, else
        "interrupted" or "time budget"."""
        window: list[float] = []  # the losses since the last logged one
        for stage in self.stages:
            if self.step >= stage.end or self.step >= until:
                continue
            if self._stage is not stage:
                self.enter_stage(stage)
            bar.set_description(stage.label)
            for batch in self._batches(stage):
                stopped = self._step(stage, batch, window, bar)
                if stopped is not None:
                    return stopped
                if self.step >= stage.end or self.step >= until:
                    break
            if self.step >= until:
                break
        return "completed"

    def _step(self, stage: Stage, batch: dict[str, Any], window: list[float], bar: Any) -> str | None:
        """One step, then what every process agrees on: the mean loss (logged every
        ``log_every`` steps), validation and checkpoint when due, and whether to stop here
        ("interrupted", "time budget"; None: go on)."""
        out = self.train_step(batch)
        self.step += 1
        budget = self.tcfg["time_budget_s"]
        spent = time.monotonic() - self.started
        out_of_time = budget is not None and spent + self._last_val_s >= budget
        flags = [out["loss"], out["grad_norm"], float(out_of_time), float(self._signal is not None)]
        loss, grad, stop, interrupted = self.procs.sum(flags)
        loss, grad = loss / self.procs.world, grad / self.procs.world
        if not math.isfinite(loss) and not self.amp:
            raise LongitudinalDiffusionError(
                f"the loss is {loss} at step {self.step} ({stage.label}): lower train.lr or set "
                "train.grad_clip; the last checkpoint is unaffected"
            )
        window.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")
        t = self.tcfg
        if t["log_every"] and (self.step % t["log_every"] == 0 or stop or interrupted):
            mean = sum(window) / len(window)
            self._record("train", {"loss": mean, "grad_norm": grad, "lr": stage.lr, "stage": stage.label})
            if bar.disable and self.procs.main:
                log.info("step %d/%d [%s] loss %.4g", self.step, self.total_steps, stage.label, mean)
            window.clear()
        if t["val_every"] and self.step % t["val_every"] == 0:
            self._validate_and_log(stage, bar)
        if t["ckpt_every"] and self.step % t["ckpt_every"] == 0:
            self.save_checkpoint()
        if interrupted or stop:
            return "interrupted" if interrupted else "time budget"
        return None

    def _finish(self, stopped: str) -> RunResult:
        """The checkpoint of the last step; unless stopped by ``until`` or a signal, a final
        validation of every stage trained so far and the export."""
        written = self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{self.step:08d}.pt"
        if not written:
            self.save_checkpoint()
        exported = None
        if stopped not in ("until", "interrupted"):
            for stage in self.stages:  # every stage trained so far, for the model card
                done = self.metrics.get(stage.label, {}).get("step", -1) >= min(stage.end, self.step)
                if (stage.start < self.step or stage.index == 0) and not done:
                    self._validate_and_log(stage, None)
            exported = self.export(stopped) if self.config["export"]["enabled"] else None
            self.procs.barrier()
        if self._writer:
            self._writer.close()
            self._writer = None
        return RunResult(self.step, stopped, self.metrics, self.last_checkpoint, exported)

    def _validate_and_log(self, stage: Stage, bar: Any) -> dict[str, Any]:
        scores = self.validate(stage)
        scores["step"] = self.step
        self.metrics[stage.label] = scores
        self._record(stage.tag, scores)
        if self.procs.main:
            text = ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if k != "step")
            (bar.write if bar is not None and not bar.disable else log.info)(
                f"validation at step {self.step} [{stage.label}]: {text}"
            )
        return scores

    # ------------------------------------------------------------------ export
    def card(self, stopped: str = "completed") -> dict[str, Any]:
        """The model card of the EMA network (catalog format)."""
        return model_card(self, stopped)

    def _export_folder(self) -> Path:
        return self.export_dir or Path(self.config["export"]["folder"] or self.run_dir / "model")

    def export(self, stopped: str = "completed") -> Path | None:
        """Save the EMA network as a catalog entry (main process) and check that it loads."""
        if not self.procs.main:
            return None
        path = catalog.save_model(self.ema.model, self.card(stopped), self._export_folder())
        catalog.load_model(path)  # the entry must load exactly as users will load it
        log.info("exported %s", path)
        return path


# ============================================================================ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a LongitudinalDiffusion method and export it as a catalog model. "
        "Run it under torchrun for several GPUs or machines.",
        epilog="examples:\n"
        "  python -m training.train --method interval --config demo --data cohort\n"
        "  torchrun --nproc_per_node 4 -m training.train --method cwdm --config paper --data /data/bids\n"
        "  python -m training.train --method sadm --config demo --resume --out runs/sadm-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=list(models.METHODS), help="the method (default: the config's)")
    p.add_argument("--config", required=True, help="a JSON config, or 'demo' / 'paper' for training/configs/M-C.json")
    p.add_argument("--data", help="the dataset folder (overrides data.root)")
    p.add_argument("--out", type=Path, help="the run folder (default: runs/<config name>)")
    p.add_argument("--steps", type=int, help="steps of every stage (overrides the config)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--export", type=Path, help="export the model to this folder (overrides export.folder)")
    p.add_argument("--time-budget", type=float, help="stop after this many seconds, then validate and export")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")  # fmt: skip
    try:
        config, path = load_config(args.config, args.method)
        if args.data:
            config["data"]["root"] = args.data
        if args.steps is not None:
            if args.steps < 1:
                raise InputError("--steps", f"must be at least 1, got {args.steps}")
            config["train"]["steps"] = args.steps
            for stage in config["train"]["stages"]:
                stage["steps"] = args.steps
        if args.time_budget is not None:
            config["train"]["time_budget_s"] = args.time_budget
        out = args.out or Path("runs") / path.stem
        trainer = Trainer(config, out, device=args.device, resume=args.resume, export_dir=args.export,
                          config_file=path, progress=not args.no_progress)  # fmt: skip
        result = trainer.run()
        if rank == 0:
            where = f"; model: {result.export}" if result.export else ""
            log.info("%s at step %d; checkpoint: %s%s", result.stopped, result.step, result.checkpoint, where)
        return 130 if result.stopped == "interrupted" else 0
    except LongitudinalDiffusionError as exc:
        print(f"training: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("training: stopped at once; resume from the last checkpoint with --resume", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
