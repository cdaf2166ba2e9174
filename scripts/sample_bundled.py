"""Sample every bundled demo model with fixed seeds and inputs, with each sampler; save the
samples, or compare them with a saved run (for changes that must not change results).

    python scripts/sample_bundled.py save before.pt      # before the change
    python scripts/sample_bundled.py compare before.pt   # after: max |difference| per output

Cas-DiffCom (both stages and two captured intermediates), the time-interval model, cWDM and
SADM; DDIM (eta 0 and 0.7), DDPM (both variances) and DPM-Solver++(2M), 4-6 steps each: 30
outputs, about a minute on 2 CPU cores. DDM runs no sampler and is left out.
"""

from __future__ import annotations

import argparse

import torch

from LongitudinalDiffusionLib.catalog import load_model
from LongitudinalDiffusionLib.diffusion import SamplerSettings
from LongitudinalDiffusionLib.models import cas_diffcom, cwdm, interval, sadm

SAMPLERS = {
    "ddim": {"name": "ddim", "steps": 6, "eta": 0.0},
    "ddim-eta": {"name": "ddim", "steps": 5, "eta": 0.7},
    "ddpm": {"name": "ddpm", "steps": 5, "variance": "fixed_large"},
    "ddpm-small": {"name": "ddpm", "steps": 4},
    "dpm": {"name": "dpm++2m", "steps": 6},
}


def _input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _settings(config: dict, key: str, chosen: dict, **extra: object) -> SamplerSettings:
    return SamplerSettings(**{**config[key], **chosen, **extra})


def run() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    models = {name: load_model(f"{name}-demo") for name in ("cas-diffcom", "interval", "cwdm", "sadm")}
    for key, chosen in SAMPLERS.items():
        m = models["cas-diffcom"]
        r = cas_diffcom.complete(
            m.network,
            _input((1, 1, 16, 20, 16), 1),
            10.0,
            20.0,
            config=m.config,
            settings=_settings(m.config, "sampler", chosen, capture=2),
            refine_settings=_settings(m.config, "refine_sampler", chosen),
        )
        assert r.high_res is not None
        out[f"cas-diffcom/{key}/low"], out[f"cas-diffcom/{key}/high"] = r.low_res, r.high_res
        out[f"cas-diffcom/{key}/captured"] = torch.stack([i.x0 for i in r.intermediates["generate"]])
        m = models["interval"]
        s = _settings(m.config, "sampler", chosen)
        out[f"interval/{key}"] = interval.generate(
            m.network, _input((1, 1, 32, 40, 32), 2), 6.0, config=m.config, settings=s
        ).sample
        m = models["cwdm"]
        conditions = (_input((1, 3, 32, 40, 32), 3) + 1) / 2
        out[f"cwdm/{key}"] = cwdm.synthesize(
            m.network, conditions, config=m.config, settings=_settings(m.config, "sampler", chosen)
        ).sample
        m = models["sadm"]
        frames = (_input((1, 3, 1, 32, 40, 32), 4) + 1) / 2
        out[f"sadm/{key}"] = sadm.fill_sequence(
            m.network,
            frames,
            torch.tensor([[0.0, 6.0, 12.0]]),
            torch.tensor([[True, False, True]]),
            config=m.config,
            settings=_settings(m.config, "sampler", chosen),
        ).frames
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("save", "compare"))
    parser.add_argument("path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = run()
    if args.mode == "save":
        torch.save(out, args.path)
        print(f"saved {len(out)} outputs to {args.path}")
        return 0
    saved = torch.load(args.path)
    worst = 0.0
    for key, value in out.items():
        diff = (value - saved[key]).abs().max().item()
        worst = max(worst, diff)
        print(f"{key:30s} max |difference| {diff:.3g}")
    print(f"largest difference over {len(out)} outputs: {worst:.3g}")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
