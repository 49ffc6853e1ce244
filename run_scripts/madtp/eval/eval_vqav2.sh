#!/usr/bin/env bash
# Evaluate a MADTP-compressed BLIP on VQAv2 with LAVIS's runner,
# on all GPUs of this node (NPROC overrides).
# Usage: eval_vqav2.sh CHECKPOINT [key=value ...]
#   CHECKPOINT: a checkpoint_<epoch>.pth of run_scripts/madtp/train/train_vqav2.sh, or a released MADTP checkpoint
#   converted by `lavis-accel convert madtp`; further key=value settings join --options, e.g. run.batch_size_eval=64
CHECKPOINT=${1:?usage: $0 CHECKPOINT [key=value ...]}
shift
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel evaluate \
  --cfg-path projects/madtp/eval/vqav2_eval.yaml --options model.finetuned="$CHECKPOINT" "$@"
