"""Captioning scored against the evaluated dataset's own reference captions: the task ``captioning_own_gt``.

LAVIS's ``captioning`` task scores every val/test split against COCO's Karpathy ground truth
(``cache_root/coco_gt/coco_karpathy_{val,test}_gt.json``, downloaded if absent), whatever the dataset: Flickr30k
(``flickr30k_caption``) or any other caption dataset cannot be scored with it. This task is LAVIS's, except for the
ground truth: when the datasets are built it is made from each evaluated split's annotation entries (an entry's
``caption``: its reference captions; its image id: the one the dataset's ``__getitem__`` gives, which the generated
captions are saved under), and at each evaluation it is written in COCO caption format to
``<job>/result/<split>_gt.json`` and scored with pycocoevalcap as LAVIS's ``coco_caption_eval`` does (BLEU-1..4,
METEOR, ROUGE-L, CIDEr, SPICE; ``agg_metrics`` = CIDEr + BLEU-4). SPICE, offline: see
``lavis_accel.compat.skip_spice_when_offline`` (left out with a warning, never reported as 0).
"""
import json
import os

from pycocoevalcap.eval import COCOEvalCap
from pycocotools.coco import COCO

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.datasets.datasets.coco_caption_datasets import COCOCapEvalDataset, NoCapsEvalDataset
from lavis.tasks.captioning import CaptionTask
from lavis_accel.errors import SettingError
from lavis_accel.registration import register_task


def image_id_of(dataset, entry):
    """The image id ``dataset[i]["image_id"]`` gives for annotation ``entry`` (without reading the image), as
    LAVIS's captioning task saves it: an int."""
    if isinstance(dataset, NoCapsEvalDataset):
        raw = entry["img_id"]
    elif isinstance(dataset, COCOCapEvalDataset):  # LAVIS's rule: the number after the file name's last "_"
        raw = entry["image"].split("/")[-1].strip(".jpg").split("_")[-1]
    else:
        raw = entry["image_id"]
    return int(raw)


def _references(entry):
    captions = entry.get("caption") if isinstance(entry, dict) else None
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        return None
    return captions


def ground_truth(name, split, dataset):
    """The COCO caption ground truth of one evaluation split, from its dataset's annotation entries.

    Refused in one line: a dataset without annotation entries, an entry without reference captions or whose image
    id is not an integer, and two images that get one id (their captions would be scored against each other's).
    """
    where = f"datasets.{name} ({split})"
    entries = getattr(dataset, "annotation", None)
    if not isinstance(entries, list) or not entries:
        raise SettingError(f"{where}: captioning_own_gt scores against a dataset's annotation entries; "
                           f"{type(dataset).__name__} has none")
    image_of_id, images, annotations = {}, [], []
    for index, entry in enumerate(entries):
        references = _references(entry)
        if references is None:
            raise SettingError(f"{where}: entry {index} has no reference captions ('caption': a list of strings), "
                               "which captioning_own_gt scores against")
        try:
            image_id = image_id_of(dataset, entry)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise SettingError(f"{where}: entry {index} has no integer image id for LAVIS's captioning task "
                               f"({type(err).__name__}: {err})") from None
        image = entry.get("image")
        if image_id in image_of_id and image_of_id[image_id] != image:
            raise SettingError(f"{where}: images {image_of_id[image_id]} and {image} both get image id {image_id}: "
                               "their captions would be scored together")
        if image_id not in image_of_id:
            image_of_id[image_id] = image
            images.append({"id": image_id, "file_name": image})
        annotations += [{"image_id": image_id, "caption": caption, "id": len(annotations) + k}
                        for k, caption in enumerate(references)]
    return {"info": {"description": f"{name} {split}: the dataset's own reference captions"}, "images": images,
            "annotations": annotations}


def score_captions(ground_truth_file, results_file):
    """pycocoevalcap's scores of a results file against a ground truth file, as LAVIS's ``coco_caption_eval``."""
    coco = COCO(ground_truth_file)
    coco_result = coco.loadRes(results_file)
    coco_eval = COCOEvalCap(coco, coco_result)
    coco_eval.evaluate()
    for metric, score in coco_eval.eval.items():
        print(f"{metric}: {score:.3f}")
    return coco_eval


@register_task("captioning_own_gt")
class OwnGroundTruthCaptionTask(CaptionTask):
    """LAVIS's captioning task, scored against the ground truth of the evaluated dataset's own annotations."""

    def build_datasets(self, cfg):
        """LAVIS's datasets; the ground truth of every validation and test split is made now, before any work."""
        datasets = super().build_datasets(cfg)
        run_cfg = cfg.run_cfg
        evaluated = set(run_cfg.get("valid_splits") or []) | set(run_cfg.get("test_splits") or [])
        self.ground_truths = {}
        for name, splits in datasets.items():
            for split, dataset in splits.items():
                if split not in evaluated:
                    continue
                if split in self.ground_truths:
                    raise SettingError(f"datasets: {split} split of datasets.{name} is the second {split} split: "
                                       "LAVIS evaluates one dataset per split")
                self.ground_truths[split] = ground_truth(name, split, dataset)
        return datasets

    @main_process
    def _report_metrics(self, eval_result_file, split_name):
        """LAVIS's ``_report_metrics``, against ``<result_dir>/<split>_gt.json`` written from the dataset."""
        if split_name not in getattr(self, "ground_truths", {}):
            raise SettingError(f"captioning_own_gt: no ground truth for split {split_name} (name it in "
                               "run.valid_splits or run.test_splits)")
        gt_file = os.path.join(registry.get_path("result_dir"), f"{split_name}_gt.json")
        with open(gt_file, "w", encoding="utf-8") as f:
            json.dump(self.ground_truths[split_name], f)
        coco_val = score_captions(gt_file, eval_result_file)

        agg_metrics = coco_val.eval["CIDEr"] + coco_val.eval["Bleu_4"]
        log_stats = {split_name: dict(coco_val.eval)}
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
            f.write(json.dumps(log_stats) + "\n")
        return {**coco_val.eval, "agg_metrics": agg_metrics}
