#!/usr/bin/env bash
# P-Former stage 1 (flant5xl prompts): BLIP-2's Q-Former pre-training plus 10 x MSE to the frozen P-Former's prompts
# (projects/pformer/train/pretrain_stage1_flant5xl.yaml) on NPROC GPUs of this node (default 8, as the reference).
#   STAGE0: the last checkpoint of train_stage0_flant5xl.sh (checkpoint_4.pth); further key=value settings join --options.
# Usage: train_stage1_flant5xl.sh STAGE0 [key=value ...]
STAGE0=${1:?usage: $0 STAGE0 [key=value ...]}
shift 1
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/pformer/train/pretrain_stage1_flant5xl.yaml --options model.pretrained_stage0="$STAGE0" "$@"
