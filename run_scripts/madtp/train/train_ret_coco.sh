#!/usr/bin/env bash
# Compress BLIP on COCO retrieval with MADTP through LAVIS's runner,
# on all GPUs of this node (NPROC overrides). Extra arguments go to lavis-accel, e.g.
#   --options run.madtp.p=0.45
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/madtp/train/ret_coco.yaml "$@"
