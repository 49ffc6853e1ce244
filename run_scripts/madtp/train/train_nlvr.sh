#!/usr/bin/env bash
# Compress BLIP on NLVR2 with MADTP through LAVIS's runner,
# on all GPUs of this node (NPROC overrides). Extra arguments go to lavis-accel, e.g.
#   --options run.madtp.p=0.3   (the paper's reductions: 0.3, 0.5, 0.6, 0.7, 0.8)
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/madtp/train/nlvr.yaml "$@"
