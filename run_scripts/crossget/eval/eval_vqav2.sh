#!/usr/bin/env bash
# Evaluate BLIP + CrossGET on VQAv2 with LAVIS's runner, on all GPUs of this node (NPROC overrides).
# Without a checkpoint, LAVIS's stock one runs with zero cross-token offsets. Extra arguments go to lavis-accel, e.g.
#   --options model.reducer.rv=8
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel evaluate --cfg-path projects/crossget/eval/vqav2.yaml "$@"
