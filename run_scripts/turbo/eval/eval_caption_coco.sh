#!/usr/bin/env bash
# Evaluate BLIP + Turbo on caption_coco with LAVIS's runner, on all GPUs of this node (NPROC overrides).
# Extra arguments go to lavis-accel, e.g. --options model.reducer.r=40
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel evaluate --cfg-path projects/turbo/eval/caption_coco_eval.yaml "$@"
