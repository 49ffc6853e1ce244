#!/usr/bin/env bash
# Fine-tune the DLIP student on Flickr30k retrieval (ITA + ITM) from its pretraining checkpoint through LAVIS's
# runner, on NPROC GPUs of this node (default 4, as the reference's pretraining).
# Usage: train_retrieval_flickr.sh PRETRAINED [key=value ...]
#   PRETRAINED: the last checkpoint of train_pretrain.sh (checkpoint_19.pth) or train_pretrain_shards.sh;
#   further key=value settings join --options, e.g. run.batch_size_train=16
PRETRAINED=${1:?usage: $0 PRETRAINED [key=value ...]}
shift
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-4} --no-python lavis-accel train \
  --cfg-path projects/dlip/train/retrieval_flickr_ft.yaml --options model.pretrained="$PRETRAINED" "$@"
