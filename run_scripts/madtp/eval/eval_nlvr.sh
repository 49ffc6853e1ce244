#!/usr/bin/env bash
# Evaluate a MADTP-compressed BLIP on NLVR2 with LAVIS's runner,
# on all GPUs of this node (NPROC overrides).
# Usage: eval_nlvr.sh CHECKPOINT [key=value ...]
#   CHECKPOINT: checkpoint_best.pth of run_scripts/madtp/train/train_nlvr.sh, or a released MADTP checkpoint
#   converted by `lavis-accel convert madtp`; further key=value settings join --options, e.g. run.batch_size_eval=64
CHECKPOINT=${1:?usage: $0 CHECKPOINT [key=value ...]}
shift
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel evaluate \
  --cfg-path projects/madtp/eval/nlvr_eval.yaml --options model.finetuned="$CHECKPOINT" "$@"
