#!/usr/bin/env bash
# Fine-tune CLIP ViT-B/16 on COCO retrieval with CrossGET through LAVIS's runner (task crossget_retrieval),
# on all GPUs of this node (NPROC overrides). Extra arguments go to lavis-accel, e.g. the fine-tuned start and
# CrossGET's other settings:
#   --options model.finetuned=/path/to/finetune_retrieval_coco_clip/checkpoint_best.pth
#   --options model.reducer.rv=0 model.reducer.rl=6     (language only)
#   --options model.reducer.rv=16 model.reducer.rl=6    (vision and language)
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=${NPROC:-8} --no-python lavis-accel train \
  --cfg-path projects/crossget/train/ret_coco_clip.yaml "$@"
