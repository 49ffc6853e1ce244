#!/usr/bin/env bash
# P-Former stage 0 for OPT-2.7B: language-only pre-training on sentences (projects/pformer/train/pretrain_stage0_opt2.7b.yaml)
# through LAVIS's runner, on NPROC GPUs of this node (default 3, as the reference's log).
# Usage: train_stage0_opt2.7b.sh SENTENCES [key=value ...]
#   SENTENCES: a json of {"caption": ...} entries (BLIP's laion_synthetic_filtered_large.json), a json list of
#   strings or a .txt file with one sentence per line; further key=value settings join --options.
SENTENCES=${1:?usage: $0 SENTENCES [key=value ...]}
shift
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-3} --no-python lavis-accel train \
  --cfg-path projects/pformer/train/pretrain_stage0_opt2.7b.yaml \
  --options datasets.laion_sentence_115m.build_info.annotations.train.storage="[$SENTENCES]" "$@"
