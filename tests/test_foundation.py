"""Install-level behaviour: import and registration, and the guarded compatibility fixes of ``compat``."""
import os
import subprocess
import sys
import urllib.error

import pytest
import torch

from lavis.common.registry import registry
from lavis_accel import checkpoints, compat, registration, runner_state

PLUGIN_ARCHS = {
    "blip_retrieval_turbo": ["coco", "flickr"],
    "blip_caption_turbo": ["base_coco", "large_coco"],
    "blip_vqa_turbo": ["vqav2"],
    "blip_nlvr_turbo": ["nlvr"],
}


def test_import_registers_models_and_reducers():
    for arch, types in PLUGIN_ARCHS.items():
        assert list(registry.get_model_class(arch).PRETRAINED_MODEL_CONFIG_DICT) == types
    for name in ("tome", "turbo"):
        assert registry.get_processor_class(name) is not None


def test_model_zoo_lists_plugin_archs_next_to_lavis():
    import lavis.models

    text = str(lavis.models.model_zoo)
    assert "blip_retrieval " in text and "blip2_opt" in text
    for arch, types in PLUGIN_ARCHS.items():
        assert f"{arch:<30} {', '.join(types)}" in text


def test_importing_again_and_reloading_raises_nothing():
    # In a child process: a reload makes new class objects, which would confuse the other tests of this session.
    # lavis.models first, as on a machine whose torchvision works (here the op schemas are declared by hand first,
    # since importing lavis_accel.compat would import the whole package).
    script = (
        "import torch\n"
        "for op in ('nms', 'qnms'):\n"
        "    torch.library.define(f'torchvision::{op}', '(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')\n"
        "import importlib, lavis.models, lavis_accel\n"
        "importlib.import_module('lavis_accel')\n"
        "importlib.reload(importlib.import_module('lavis_accel.models.blip_turbo'))\n"
        "importlib.reload(importlib.import_module('lavis_accel.processors.reducers'))\n"
        "from lavis.common.registry import registry\n"
        "print(registry.get_model_class('blip_retrieval_turbo').__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "BlipRetrievalTurbo"


def test_a_taken_name_is_refused_in_one_line():
    from lavis.models.base_model import BaseModel

    class Impostor(BaseModel):
        PRETRAINED_MODEL_CONFIG_DICT = {}

    with pytest.raises(KeyError, match="model name 'blip_retrieval' is already registered by lavis"):
        registration.register_model("blip_retrieval")(Impostor)


def test_stock_lavis_classes_are_untouched():
    from lavis.models.blip_models.blip_retrieval import BlipRetrieval
    from lavis.models.vit import Attention, Block

    assert registry.get_model_class("blip_retrieval") is BlipRetrieval
    assert Block.forward.__module__ == Attention.forward.__module__ == "lavis.models.vit"


def test_torchvision_works_after_the_fix_and_the_fix_is_idempotent():
    compat.ensure_torchvision_importable()
    from PIL import Image
    from torchvision import transforms

    image = Image.new("RGB", (40, 30), (255, 0, 0))
    tensor = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])(image)
    assert tensor.shape == (3, 16, 16) and tensor[0].min() == 1.0


def test_cpu_fixes_leave_lavis_alone_where_cuda_is_available():
    script = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "import lavis_accel\n"
        "import lavis.datasets.data_utils as data_utils, lavis.runners.runner_base as runner_base\n"
        "import lavis.tasks.base_task as base_task\n"
        "from lavis.datasets.datasets.dataloader_utils import PrefetchLoader\n"
        "print(runner_base.PrefetchLoader is PrefetchLoader, base_task.prepare_sample is data_utils.prepare_sample)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["True", "True"]


def test_cpu_runner_fixes_are_idempotent():
    import lavis.runners.runner_base as runner_base

    model_property = runner_base.RunnerBase.model
    compat.enable_cpu_runner()
    runner_state.enable_exact_resume()
    assert runner_base.RunnerBase.model is model_property
    if not torch.cuda.is_available():
        assert runner_base.PrefetchLoader is compat._HostLoader


def test_distributed_calls_without_process_group_answer_for_one_process():
    import torch.distributed as dist

    proxy = compat._SingleProcessDistributed(dist)
    assert proxy.barrier() is None
    assert (proxy.get_rank(), proxy.get_world_size(), proxy.is_initialized()) == (0, 1, False)
    tensors = torch.ones(2, 3)
    assert compat._gather_with_grad_if_distributed(None)(tensors) is tensors


def test_distributed_calls_with_a_process_group_go_to_torch(single_process_group):
    import torch.distributed as dist
    from lavis.models.base_model import all_gather_with_grad

    import lavis.models.blip2_models.blip2_qformer as blip2_qformer

    proxy = compat._SingleProcessDistributed(dist)
    assert proxy.is_initialized() and proxy.get_world_size() == dist.get_world_size() == 1
    assert proxy.barrier() is None  # the real barrier, over one rank
    tensors = torch.ones(2, 3)
    assert blip2_qformer.all_gather_with_grad(tensors) is tensors  # LAVIS's own one-rank answer
    assert all_gather_with_grad(tensors) is tensors


def test_resume_accepts_only_missing_frozen_parameters():
    from lavis_accel.errors import SettingError

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    load = runner_state.resume_load_state_dict(model, "ckpt.pth")
    trainable = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
    load(trainable)
    with pytest.raises(SettingError, match=r"run.resume_ckpt_path: ckpt.pth does not fit Sequential: missing \['0.bias'\]"):
        load({"0.weight": trainable["0.weight"]})
    with pytest.raises(SettingError, match=r"0.weight \[3, 2\] in the file vs \[2, 2\] in the model"):
        load({**trainable, "0.weight": torch.zeros(3, 2)})


def test_spice_is_skipped_not_zeroed_when_corenlp_cannot_be_fetched(tmp_path, monkeypatch, caplog):
    import json

    import pycocoevalcap.spice.spice as spice_module
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    def offline():
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(spice_module, "get_stanford_models", offline)
    gt = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "id": 1, "caption": "a red circle"}],
          "type": "captions", "info": {}, "licenses": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": 1, "caption": "a red circle"}]))
    coco = COCO(str(tmp_path / "gt.json"))
    evaluation = COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    evaluation.evaluate()
    assert "SPICE" not in evaluation.eval and "SPICE" not in evaluation.evalImgs[0]
    assert evaluation.eval["CIDEr"] >= 0 and "Bleu_4" in evaluation.eval
    assert "SPICE skipped" in caplog.text
