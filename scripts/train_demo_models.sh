#!/usr/bin/env bash
# Reproduce the bundled demo models and their evaluation table on a CPU:
#   simulate the training cohort, train every method with its demo config (each stops at its
#   time budget, see training/configs/*-demo.json), export to Resources/Models, then evaluate
#   all of them against the baselines on the untouched test subjects into docs/evaluation/.
# Usage: bash scripts/train_demo_models.sh [WORKDIR]   (default: ./demo-training)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-$here/demo-training}"
bash "$here/scripts/setup_env.sh" test
py="$here/.venv/bin/python"
cd "$here"
if [ ! -d "$work/cohort5" ]; then
  "$here/.venv/bin/longdiff" -q demo-data "$work/cohort5" --subjects 16 --hearts 6 --seed 11 \
    --spacing 5 --fov 160 200 160
fi
for method in cwdm ddm interval cas-diffcom sadm tissue-seg; do
  echo "== training $method"
  "$py" -m training.train --method "$method" --config demo --data "$work/cohort5" --out "$work/runs/$method" \
    --device cpu --no-progress
done
# DDM on the cines' own grid, fine-tuned from ddm-demo (train.init_from), 250 steps
echo "== training ddm on the cines' grid"
"$py" -m training.train --method ddm --config training/configs/ddm-demo-2mm.json --data "$work/cohort5" \
  --out "$work/runs/ddm-2mm" --device cpu --no-progress
# SADM on a 4 mm grid, fine-tuned from sadm-demo (the patch positions resampled, sadm.adapt_state)
# on the same subjects simulated at 4 mm, 600 steps
if [ ! -d "$work/cohort4" ]; then
  "$here/.venv/bin/longdiff" -q demo-data "$work/cohort4" --subjects 16 --no-heart --seed 11 --spacing 4 \
    --fov 160 200 160
fi
echo "== training sadm on a 4 mm grid"
"$py" -m training.train --method sadm --config training/configs/sadm-demo-4mm.json --data "$work/cohort4" \
  --out "$work/runs/sadm-4mm" --device cpu --no-progress
# Scored once, on the untouched test subjects (sub-017..022, three new hearts), never on the
# validation subjects the training chose by (docs/evaluation/README.md).
if [ ! -d "$work/testsets/in-distribution" ]; then
  "$py" -m training.test_sets --out "$work/testsets"
fi
"$py" -m training.evaluate --data "$work/testsets/in-distribution" --reference "$work/cohort5" \
  --name in-distribution --out "$here/docs/evaluation" \
  --model cas-diffcom=cas-diffcom-demo --model sadm=sadm-demo --model interval=interval-demo \
  --model cwdm=cwdm-demo --model ddm=ddm-demo --model tissue-seg=tissue-seg-brain-demo
# one model per method and run: the second DDM is scored in a run of its own
"$py" -m training.evaluate --data "$work/testsets/in-distribution" --reference "$work/cohort5" \
  --name in-distribution --out "$work/evaluation-ddm-2mm" --model ddm=ddm-demo-2mm
# the 4 mm SADM, on the 4 mm scans it is made for (and the 1 x 1 x 4 mm ones)
for set in 4mm aniso; do
  "$py" -m training.evaluate --data "$work/testsets/$set" --reference "$work/cohort5" \
    --name "$set" --out "$here/docs/evaluation/sadm-demo-4mm/$set" --model sadm=sadm-demo-4mm
done
