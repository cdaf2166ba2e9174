"""Print the white/grey-matter contrast of one simulated subject across ages (docs table).

python scripts/contrast_table.py [--seed 0] [--subject 1]
"""

from __future__ import annotations

import argparse

import numpy as np

from LongitudinalDiffusionLib.demo import brain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subject", type=int, default=1, help="subject index (0-based)")
    args = parser.parse_args()
    subject = brain.draw_subject(np.random.default_rng([args.seed, args.subject]), "x", lesion_probability=0.0)
    ages = (0.5, 3.0, 6.0, 9.0, 12.0, 18.0, 24.0)
    rows = {m: [] for m in ("T1w", "T2w")}
    for age in ages:
        ses = brain.simulate_session(
            subject, age, np.random.default_rng(1), shape=(40, 48, 40), spacing=(4.0, 4.0, 4.0), modalities=tuple(rows)
        )
        lab = ses.labels.array
        for m in rows:
            img = ses.images[m].array
            rows[m].append(img[lab == 3].mean() / img[lab == 2].mean())
    print("| age (months) | " + " | ".join(f"{a:g}" for a in ages) + " |")
    print("|---" * (len(ages) + 1) + "|")
    for m, values in rows.items():
        print(f"| {m} WM/GM | " + " | ".join(f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
