#!/usr/bin/env bash
# P-Former stage 2 (opt2.7b): BLIP-2's generative pre-training with the frozen LLM plus 100 x MSE to the frozen
# P-Former's prompts (projects/pformer/train/pretrain_stage2_opt2.7b.yaml) on NPROC GPUs of this node (default 8).
#   STAGE1: the last checkpoint of train_stage1_opt2.7b.sh (checkpoint_9.pth); STAGE0: that of train_stage0_opt2.7b.sh;
#   further key=value settings join --options.
# Usage: train_stage2_opt2.7b.sh STAGE1 STAGE0 [key=value ...]
STAGE1=${1:?usage: $0 STAGE1 STAGE0 [key=value ...]}
STAGE0=${2:?usage: $0 STAGE1 STAGE0 [key=value ...]}
shift 2
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/pformer/train/pretrain_stage2_opt2.7b.yaml --options model.pretrained="$STAGE1" model.pretrained_stage0="$STAGE0" "$@"
