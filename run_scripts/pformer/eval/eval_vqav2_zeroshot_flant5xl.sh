#!/usr/bin/env bash
# Zero-shot VQAv2 val with the stock LAVIS BLIP-2 (flant5xl) loading a P-Former stage-2 checkpoint
# (projects/pformer/eval/vqav2_zeroshot_flant5xl_eval.yaml) on NPROC GPUs of this node (default 8).
#   STAGE2: the last checkpoint of run_scripts/pformer/train/train_stage2_flant5xl.sh; further key=value settings join --options.
# Usage: eval_vqav2_zeroshot_flant5xl.sh STAGE2 [key=value ...]
STAGE2=${1:?usage: $0 STAGE2 [key=value ...]}
shift 1
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel evaluate \
  --cfg-path projects/pformer/eval/vqav2_zeroshot_flant5xl_eval.yaml --options model.pretrained="$STAGE2" "$@"
