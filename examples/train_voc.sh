#!/usr/bin/env bash
# Reproduce APC on PASCAL VOC 2012: train on train_aug (20k steps, global batch 8, 448 crops, bf16), evaluate on
# val with the standard protocol (multi-scale 1.0/1.25/1.5 + flip + dense CRF), judge the pseudo-labels on train,
# segment a few photos, and (with PUSH_TO=USER/apc-voc) upload the model.
#
#   bash examples/train_voc.sh data/VOCdevkit          # one GPU
#   NUM_GPUS=4 bash examples/train_voc.sh data/VOCdevkit
#
# Re-running it after an interruption resumes from the last checkpoint (--resume_from_checkpoint latest).
# Data layout: docs/data.md. Every step: docs/training.md.
set -euo pipefail

DATA_DIR=${1:-data/VOCdevkit}
NUM_GPUS=${NUM_GPUS:-1}
OUT=${OUT:-apc-voc}
HERE=$(cd "$(dirname "$0")" && pwd)

if (( 8 % NUM_GPUS != 0 )); then
    echo "NUM_GPUS=$NUM_GPUS must divide the global batch of 8" >&2
    exit 2
fi
if (( NUM_GPUS > 1 )); then
    TRAIN=(accelerate launch --config_file "$HERE/accelerate_multi_gpu.yaml" --num_processes "$NUM_GPUS" -m apc_seg.train)
    EVAL=(accelerate launch --config_file "$HERE/accelerate_multi_gpu.yaml" --num_processes "$NUM_GPUS" -m apc_seg.evaluation)
else
    TRAIN=(apc-train)
    EVAL=(apc-eval)
fi

"${TRAIN[@]}" --recipe voc --data_dir "$DATA_DIR" --output_dir "$OUT" \
    --per_device_train_batch_size $((8 / NUM_GPUS)) --resume_from_checkpoint latest

"${EVAL[@]}" --model "$OUT" --dataset voc --data_dir "$DATA_DIR" --split val \
    --scales 1.0,1.25,1.5 --flip --crf --output_json "$OUT/eval/val_msf_crf.json"
"${EVAL[@]}" --model "$OUT" --dataset voc --data_dir "$DATA_DIR" --split train --mode pseudo \
    --output_json "$OUT/eval/train_pseudo.json"

VOC2012=$(find "$DATA_DIR" -maxdepth 2 -type d -name VOC2012 | head -n 1)
apc-infer --model "$OUT" "${VOC2012:-$DATA_DIR}/JPEGImages/2007_000032.jpg" --output_dir "$OUT/predictions" \
    --scales 1.0,1.25,1.5 --flip

if [[ -n "${PUSH_TO:-}" ]]; then
    apc-push --model_dir "$OUT" --repo_id "$PUSH_TO"
fi
