#!/bin/bash
# Imports the authors' nine ResNets and measures them offline (README "The paper's own models"):
# acet_tf's Table 2 and the authors' graph's Table 2 on the same draws, then acet_tf's adversarial
# noise (the paper's 200-step attack) from uniform noise. Wall times go to OUT_DIR/timing.txt.
#   tools/paper_models.sh REFERENCE_DIR OUT_DIR [TABLE2_DRAWS=1000] [ADV_NOISE_POINTS=100]
# A model whose results are already in OUT_DIR is not measured again (rerun after an interruption).
set -euo pipefail
ref=${1:?reference_models dir}; out=${2:?output dir}; draws=${3:-1000}; points=${4:-100}
names="svhn_plain svhn_ceda svhn_acet cifar10_plain cifar10_ceda cifar10_acet cifar100_plain
       cifar100_ceda cifar100_acet"
mkdir -p "$out"
for name in $names; do
  run=$out/runs/paper_$name
  [ -d "$run" ] || python -m acet_tf.import_reference --checkpoint="$ref/$name/model-100" \
      --dataset="${name%_*}" --method="${name#*_}" --workdir="$run"
  [ -s "$out/oracle_$name.json" ] && continue
  start=$(date +%s)
  python -m acet_tf.evaluate --workdir="$run" --sets=table2 --table2_examples="$draws" \
      --output_dir="$out/eval_table2/$name" > /dev/null
  mid=$(date +%s)
  python -m tools.reference_oracle --checkpoint="$ref/$name/model-100" \
      --table2_examples="$draws" > "$out/oracle_$name.json"
  echo "$name table2_s=$((mid - start)) oracle_table2_s=$(($(date +%s) - mid))" \
      | tee -a "$out/timing.txt"
done
for name in $names; do
  [ -s "$out/eval_adv_noise/$name/results.json" ] && continue
  start=$(date +%s)
  python -m acet_tf.evaluate --workdir="$out/runs/paper_$name" --sets=adv_noise \
      --max_examples="$points" --output_dir="$out/eval_adv_noise/$name" > /dev/null
  echo "$name adv_noise_s=$(($(date +%s) - start))" | tee -a "$out/timing.txt"
done
