#!/usr/bin/env bash
# Evaluate a MADTP-compressed CLIP ViT-L/14-336 on COCO retrieval with LAVIS's runner,
# on all GPUs of this node (NPROC overrides).
# Usage: eval_ret_coco_clip.sh CHECKPOINT [key=value ...]
#   CHECKPOINT: checkpoint_best.pth of run_scripts/madtp/train/train_ret_coco_clip.sh, or a released MADTP checkpoint
#   converted by `lavis-accel convert madtp`; further key=value settings join --options, e.g. run.batch_size_eval=64
CHECKPOINT=${1:?usage: $0 CHECKPOINT [key=value ...]}
shift
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel evaluate \
  --cfg-path projects/madtp/eval/ret_coco_clip_eval.yaml --options model.finetuned="$CHECKPOINT" "$@"
