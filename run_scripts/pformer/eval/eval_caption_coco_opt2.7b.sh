#!/usr/bin/env bash
# COCO captioning (Karpathy test) with the stock LAVIS blip2_opt loading a P-Former COCO caption checkpoint
# (projects/pformer/eval/caption_coco_opt2.7b_eval.yaml) on NPROC GPUs of this node (default 8).
#   CHECKPOINT: checkpoint_best.pth of run_scripts/pformer/train/train_caption_coco_opt2.7b.sh; further key=value
#   settings join --options.
# Usage: eval_caption_coco_opt2.7b.sh CHECKPOINT [key=value ...]
CHECKPOINT=${1:?usage: $0 CHECKPOINT [key=value ...]}
shift 1
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel evaluate \
  --cfg-path projects/pformer/eval/caption_coco_opt2.7b_eval.yaml --options model.finetuned="$CHECKPOINT" "$@"
