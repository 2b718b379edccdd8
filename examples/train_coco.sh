#!/usr/bin/env bash
# Reproduce APC on MS COCO 2014: train on train2014 (80k steps, global batch 8, 448 crops, bf16), evaluate on
# val2014 (multi-scale 1.0/1.25/1.5 + flip + dense CRF), judge the pseudo-labels on a train subset, segment a
# photo, and (with PUSH_TO=USER/apc-coco) upload the model.
#
#   bash examples/train_coco.sh data/coco              # one GPU; needs pip install "apc-seg[coco,crf]"
#   NUM_GPUS=8 bash examples/train_coco.sh data/coco
#
# Re-running it after an interruption resumes from the last checkpoint (--resume_from_checkpoint latest).
# Data layout: docs/data.md. Every step: docs/training.md.
set -euo pipefail

DATA_DIR=${1:-data/coco}
NUM_GPUS=${NUM_GPUS:-1}
OUT=${OUT:-apc-coco}
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

"${TRAIN[@]}" --recipe coco --data_dir "$DATA_DIR" --output_dir "$OUT" \
    --per_device_train_batch_size $((8 / NUM_GPUS)) --resume_from_checkpoint latest

"${EVAL[@]}" --model "$OUT" --dataset coco --data_dir "$DATA_DIR" --split val \
    --scales 1.0,1.25,1.5 --flip --crf --output_json "$OUT/eval/val_msf_crf.json"
"${EVAL[@]}" --model "$OUT" --dataset coco --data_dir "$DATA_DIR" --split train --mode pseudo --max_images 5000 \
    --output_json "$OUT/eval/train_pseudo.json"

apc-infer --model "$OUT" "$(find "$DATA_DIR/val2014" -name '*.jpg' | sort | head -n 1)" \
    --output_dir "$OUT/predictions" --scales 1.0,1.25,1.5 --flip

if [[ -n "${PUSH_TO:-}" ]]; then
    apc-push --model_dir "$OUT" --repo_id "$PUSH_TO"
fi
