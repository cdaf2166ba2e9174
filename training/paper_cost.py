"""The cost of one training step of each method at paper scale: counted and measured.

``python -m training.paper_cost`` builds each method's paper-scale network
(``default_config(method, "paper")``, what ``training/configs/<method>-paper.json`` trains)
and runs one step of its own training loss - forward and backward - on a batch of 1:

* **counted at the paper grid**: the floating-point operations of that step at the full
  paper resolution, with PyTorch's ``FlopCounterMode`` on the ``meta`` device (shapes only:
  no memory, no arithmetic; a multiply-add counts as 2);
* **measured at a reduced grid**: the wall time of the same step on this CPU at a grid
  ``--shrink`` times smaller per side (the full grid's training activations do not fit in
  memory here), and the operations counted there, so the measured CPU throughput can be
  compared with the count.

It prints one JSON line per method (and stage); ``docs/evaluation/paper-scale.md`` turns
them into GPU-hour estimates.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch

from LongitudinalDiffusionLib import models

METHODS = ("cas-diffcom", "sadm", "interval", "cwdm", "ddm")


def _size(config: dict, key: str, shrink: int) -> list[int]:
    """The grid ``shrink`` times smaller per side, in multiples of 16 (the U-Nets halve it
    up to four times)."""
    return [max(16, 16 * round(int(s) / shrink / 16)) for s in config[key]]


def _voxels(size: list[int]) -> float:
    return float(math.prod(size))


def _scaled_config(method: str, shrink: int) -> dict:
    config = models.default_config(method, "paper")
    if shrink > 1:
        config = json.loads(json.dumps(config))
        config["image_size"] = _size(config, "image_size", shrink)
        if "sr_image_size" in config:
            config["sr_image_size"] = [s * 2 for s in config["image_size"]]  # the 2x refiner
    return config


def batch(method: str, config: dict, stage: str | None, device: str) -> dict[str, Any]:
    """A batch of 1 in the format of the method's loss (random images in [-1, 1])."""
    size = config["image_size"]

    def img(*lead: int, shape: list[int] | None = None) -> torch.Tensor:
        return torch.rand(1, *lead, *(shape or size), device=device) * 2 - 1

    one = torch.ones(1, device=device)
    if method == "interval":
        return {"source": img(1), "target": img(1), "interval": one * 6.0}
    if method == "ddm":
        return {"source": img(1), "target": img(1)}
    if method == "cwdm":
        n = len(config["modalities"]) if config.get("any_missing") else len(config["conditions"])
        return {"conditions": img(n), "target": img(1)}
    if method == "sadm":
        # the bookkeeping tensors stay on the CPU: the loss checks them (no values on "meta")
        f = int(config["max_frames"])
        present = torch.ones(1, f, dtype=torch.bool)
        ages = torch.arange(f, dtype=torch.float32)[None] * 3.0
        return {"frames": img(f, 1), "ages": ages, "present": present, "target_index": torch.tensor([f - 1])}
    if method == "cas-diffcom" and stage == "generator":
        guidance = img(1)
        return {"stage": "generator", "guidance_lr": guidance, "guidance_reference": guidance, "target_lr": img(1)} | {
            "guidance_age": one * 3.0,
            "target_age": one * 6.0,
        }
    if method == "cas-diffcom":
        return {"stage": "refiner", "low_res": img(1), "target_hr": img(1, shape=config["sr_image_size"])}
    raise ValueError(f"unknown method {method}")


def step(method: str, config: dict, stage: str | None, device: str) -> tuple[float, float]:
    """(FLOPs, seconds) of one loss forward + backward on a batch of 1."""
    from torch.utils.flop_counter import FlopCounterMode

    module = models.method_module(method)
    with torch.device(device):
        network = module.build(config)
    network.train()
    data = batch(method, config, stage, device)
    counter = FlopCounterMode(display=False)
    t0 = time.perf_counter()
    with counter:
        loss = module.loss(network, data, config)
        if isinstance(loss, tuple):
            loss = loss[0]
        loss.backward()
    return float(counter.get_total_flops()), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.paper_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--shrink", type=int, default=4, help="the measured grid is this much smaller per side")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-measure", action="store_true", help="only count at the paper grid")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for method in args.methods:
        for stage in ("generator", "refiner") if method == "cas-diffcom" else (None,):
            full = models.default_config(method, "paper")
            params = sum(p.numel() for p in models.method_module(method).build(full).parameters())
            row: dict[str, Any] = {"method": method, "stage": stage, "parameters": params}
            row |= {"paper_grid": full["image_size"] if stage != "refiner" else full["sr_image_size"]}
            try:
                flops_full, _ = step(method, full, stage, "meta")
                row["counted"] = "at the paper grid"
            except Exception:  # a loss that reads values (SADM checks its masks) cannot run on "meta"
                # count on the CPU at 1/4 and 1/2 of the grid per side and extend the power law in voxels
                c4, c2 = _scaled_config(method, 4), _scaled_config(method, 2)
                (f4, _), (f2, _) = step(method, c4, stage, "cpu"), step(method, c2, stage, "cpu")
                v4, v2, vf = (_voxels(c["image_size"]) for c in (c4, c2, full))
                exponent = math.log(f2 / f4) / math.log(v2 / v4)
                flops_full = f2 * (vf / v2) ** exponent
                row["counted"] = f"extrapolated from 1/4 and 1/2 per side (FLOPs ~ voxels^{exponent:.3f})"
            row["paper_step_tflop"] = round(flops_full / 1e12, 3)
            if not args.no_measure:
                small = _scaled_config(method, args.shrink)
                step(method, small, stage, "cpu")  # warm-up
                flops, seconds = step(method, small, stage, "cpu")
                row |= {"measured_grid": small["image_size"] if stage != "refiner" else small["sr_image_size"]}
                row |= {"measured_step_s": round(seconds, 3), "measured_step_gflop": round(flops / 1e9, 2)}
                row["cpu_gflop_per_s"] = round(flops / 1e9 / seconds, 2)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
