#!/usr/bin/env bash
# Evaluate a CrossGET CLIP ViT-B/16 on COCO retrieval with LAVIS's runner,
# on all GPUs of this node (NPROC overrides).
# Usage: eval_ret_coco_clip.sh CHECKPOINT [key=value ...]
#   CHECKPOINT: checkpoint_best.pth of run_scripts/crossget/train/train_ret_coco_clip.sh (or the reference's); further
#   key=value settings join --options, e.g. model.reducer.rv=0 model.reducer.rl=6 for a language-only checkpoint
CHECKPOINT=${1:?usage: $0 CHECKPOINT [key=value ...]}
shift
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel evaluate \
  --cfg-path projects/crossget/eval/ret_coco_clip.yaml --options model.finetuned="$CHECKPOINT" "$@"
