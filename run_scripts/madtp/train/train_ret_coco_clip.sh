#!/usr/bin/env bash
# Compress CLIP ViT-L/14-336 on COCO retrieval with MADTP through LAVIS's runner,
# on all GPUs of this node (NPROC overrides). Extra arguments go to lavis-accel, e.g.
#   --options model.pretrained=/path/to/clip_large_retrieval_coco.pth
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/madtp/train/ret_coco_clip.yaml "$@"
