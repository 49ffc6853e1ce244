#!/usr/bin/env bash
# Pretrain the DLIP student (ViT-S/16 + BERT-small) with distillation from a frozen BLIP ViT-B teacher through
# LAVIS's runner, on CC3M + COCO + SBU + Visual Genome captions (LAVIS's builders), on NPROC GPUs of this node
# (default 4: the reference's 4 A100s at batch 288 each). Extra arguments go to lavis-accel, e.g.
#   --options model.teacher.pretrained=/path/to/model_base_capfilt_large.pth   (offline: a local teacher checkpoint)
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-4} --no-python lavis-accel train \
  --cfg-path projects/dlip/train/pretrain.yaml "$@"
