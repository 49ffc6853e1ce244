#!/usr/bin/env bash
# P-Former stage 1 (opt2.7b prompts): BLIP-2's Q-Former pre-training plus 10 x MSE to the frozen P-Former's prompts
# (projects/pformer/train/pretrain_stage1.yaml) on NPROC GPUs of this node (default 8, as the reference).
#   STAGE0: the last checkpoint of train_stage0_opt2.7b.sh (checkpoint_4.pth); further key=value settings join --options.
# Usage: train_stage1_opt2.7b.sh STAGE0 [key=value ...]
STAGE0=${1:?usage: $0 STAGE0 [key=value ...]}
shift 1
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/pformer/train/pretrain_stage1.yaml --options model.pretrained_stage0="$STAGE0" "$@"
