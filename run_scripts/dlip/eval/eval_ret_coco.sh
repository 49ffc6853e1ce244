#!/usr/bin/env bash
# Evaluate a fine-tuned DLIP student on COCO retrieval with LAVIS's runner, on NPROC GPUs of this node (default 4).
# Usage: eval_ret_coco.sh CHECKPOINT [key=value ...]
#   CHECKPOINT: a DLIP retrieval checkpoint_best.pth fine-tuned on COCO (see projects/dlip/eval/ret_coco_eval.yaml);
#   further key=value settings join --options, e.g. run.batch_size_eval=32
CHECKPOINT=${1:?usage: $0 CHECKPOINT [key=value ...]}
shift
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-4} --no-python lavis-accel evaluate \
  --cfg-path projects/dlip/eval/ret_coco_eval.yaml --options model.finetuned="$CHECKPOINT" "$@"
