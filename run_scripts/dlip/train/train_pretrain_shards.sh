#!/usr/bin/env bash
# Pretrain the DLIP student as train_pretrain.sh, streaming img2dataset tar shards (LAVIS's iteration-based runner),
# on NPROC GPUs of this node (default 4: the reference's 4 A100s at batch 288 each).
# Usage: train_pretrain_shards.sh SHARDS [key=value ...]
#   SHARDS: a brace pattern over the shards, e.g. '/data/cc3m/{00000..00331}.tar' (quoted), or a list of them,
#   '["/data/cc3m/{00000..00331}.tar","/data/sbu/{00000..00099}.tar"]'; further key=value settings join --options,
#   e.g. run.iters_per_inner_epoch=4400 run.max_iters=88000 (one inner epoch: one pass over the data)
SHARDS=${1:?usage: $0 SHARDS [key=value ...]}
shift
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-4} --no-python lavis-accel train \
  --cfg-path projects/dlip/train/pretrain_shards.yaml \
  --options datasets.image_text_shards.build_info.storage="$SHARDS" "$@"
