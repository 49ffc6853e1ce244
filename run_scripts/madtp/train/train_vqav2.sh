#!/usr/bin/env bash
# Compress BLIP on VQAv2 with MADTP through LAVIS's runner,
# on all GPUs of this node (NPROC overrides). Extra arguments go to lavis-accel, e.g.
#   --options run.madtp.p=0.75
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/madtp/train/vqav2.yaml "$@"
