#!/usr/bin/env bash
# Compress BLIP on Flickr30k retrieval with MADTP through LAVIS's runner,
# on all GPUs of this node (NPROC overrides). Extra arguments go to lavis-accel, e.g.
#   --options run.madtp.p=0.75 model.reducer.temperature=2.0 run.madtp.calculate_temperature=False
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/madtp/train/ret_flickr.yaml "$@"
