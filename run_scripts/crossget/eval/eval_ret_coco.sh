#!/usr/bin/env bash
# Evaluate BLIP + CrossGET on COCO retrieval with LAVIS's runner, on all GPUs of this node (NPROC overrides).
# Without a checkpoint, LAVIS's stock one runs with zero cross-token offsets. Extra arguments go to lavis-accel, e.g.
#   --options model.finetuned=/path/to/checkpoint_best.pth   (of run_scripts/crossget/train/train_ret_coco.sh;
#   give the rv/rl it was trained at, e.g. model.reducer.rl=6)
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel evaluate --cfg-path projects/crossget/eval/ret_coco.yaml "$@"
