#!/usr/bin/env bash
# Fine-tune a P-Former-trained BLIP-2 (OPT-2.7B) on COCO captioning (projects/pformer/train/caption_coco_ft_opt2.7b.yaml)
# on NPROC GPUs of this node (default 8).
#   STAGE2: the last checkpoint of train_stage2_opt2.7b.sh; STAGE0: that of train_stage0_opt2.7b.sh;
#   further key=value settings join --options.
# Usage: train_caption_coco_opt2.7b.sh STAGE2 STAGE0 [key=value ...]
STAGE2=${1:?usage: $0 STAGE2 STAGE0 [key=value ...]}
STAGE0=${2:?usage: $0 STAGE2 STAGE0 [key=value ...]}
shift 2
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/pformer/train/caption_coco_ft_opt2.7b.yaml --options model.pretrained="$STAGE2" model.pretrained_stage0="$STAGE0" "$@"
