#!/usr/bin/env bash
# Evaluate a fine-tuned DLIP student on Flickr30k captioning with LAVIS's runner,
# on NPROC GPUs of this node (default 4).
# Usage: eval_caption_flickr.sh CHECKPOINT [key=value ...]
#   CHECKPOINT: checkpoint_best.pth of run_scripts/dlip/train/train_caption_flickr.sh;
#   further key=value settings join --options, e.g. run.batch_size_eval=32
CHECKPOINT=${1:?usage: $0 CHECKPOINT [key=value ...]}
shift
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-4} --no-python lavis-accel evaluate \
  --cfg-path projects/dlip/eval/caption_flickr_eval.yaml --options model.finetuned="$CHECKPOINT" "$@"
