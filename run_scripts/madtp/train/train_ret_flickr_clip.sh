#!/usr/bin/env bash
# Compress CLIP ViT-L/14-336 on Flickr30k retrieval with MADTP through LAVIS's runner,
# on all GPUs of this node (NPROC overrides). Extra arguments go to lavis-accel, e.g.
#   --options run.madtp.p=0.55
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/madtp/train/ret_flickr_clip.yaml "$@"
