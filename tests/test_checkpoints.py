"""The one checkpoint loader (weights only; hostile, text and truncated files refused in one line), atomic writes,
stale temporary files, and the training state an exact resume needs."""
import os
import random

import numpy as np
import pytest
import torch

from lavis_accel import checkpoints
from lavis_accel.errors import SettingError
from lavis_accel.runner_state import check_resume_contents


class _Hostile:
    """Unpickling this would create a file: a stand-in for code a hostile checkpoint runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_hostile_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    torch.save({"model": {}, "payload": _Hostile(str(marker))}, path)
    with pytest.raises(SettingError) as err:
        checkpoints.safe_load(str(path), "model.finetuned")
    assert not marker.exists()
    assert str(err.value).startswith(f"model.finetuned: {path} is refused: loading it would import")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, expected", [
    (b"just some text\n", "is not a torch checkpoint"),
    (b"", "is not a"),
])
def test_text_and_empty_files_are_refused(tmp_path, content, expected):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(content)
    with pytest.raises(SettingError, match=f"run.resume_ckpt_path: {path} {expected}"):
        checkpoints.safe_load(str(path), "run.resume_ckpt_path")


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SettingError, match="is not a readable torch checkpoint"):
        checkpoints.safe_load(str(path), "model.finetuned")


def test_loading_safely_routes_torch_load_and_restores_it(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    stock = torch.load
    with checkpoints.loading_safely({str(path): "model.finetuned"}) as loaded:
        assert torch.load(str(path), map_location="cpu")["model"]["w"].sum() == 2
    assert torch.load is stock and len(loaded) == 1


def test_resume_contents_are_checked():
    check_resume_contents({"model": {}, "optimizer": {}, "epoch": 0}, "run.resume_ckpt_path", "x.pth")
    with pytest.raises(SettingError, match=r"x.pth has no optimizer: it is not a LAVIS training checkpoint"):
        check_resume_contents({"model": {}, "epoch": 0}, "run.resume_ckpt_path", "x.pth")
    with pytest.raises(SettingError, match="holds a list"):
        check_resume_contents([], "run.resume_ckpt_path", "x.pth")


def test_checkpoints_are_written_atomically(tmp_path):
    target = tmp_path / "checkpoint_0.pth"
    target.write_bytes(b"previous")

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoints.save_atomically(failing_save)({"model": {}}, str(target))
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["checkpoint_0.pth"]
    checkpoints.save_atomically(torch.save)({"epoch": 3}, str(target))
    assert torch.load(target)["epoch"] == 3


def test_checkpoints_keep_the_file_mode_torch_save_would_give(tmp_path):
    umask = os.umask(0o022)
    try:
        checkpoints.save_atomically(torch.save)({"epoch": 0}, str(tmp_path / "checkpoint.pth"))
    finally:
        os.umask(umask)
    assert (tmp_path / "checkpoint.pth").stat().st_mode & 0o777 == 0o644


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    dead = tmp_path / ".tmp-999999999-abc.pth"  # no such process
    alive = tmp_path / f".tmp-{os.getpid()}-abc.pth"  # a writer still at work
    legacy = tmp_path / ".tmp-k2j3h4.pth"  # written before temp names carried the writer's pid
    for path in (dead, alive, legacy):
        path.write_bytes(b"partial")
    checkpoints.save_atomically(torch.save)({"epoch": 0}, str(tmp_path / "checkpoint_0.pth"))
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint_0.pth", alive.name])


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    path = tmp_path / "rng.pth"
    torch.save({"rng": [checkpoints.rng_state()]}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoints.set_rng_state(checkpoints.safe_load(str(path), "rng")["rng"][0])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_momentum_state_holds_the_momentum_copies_of_model_pairs():
    class Momentum(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.encoder_m = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.encoder_m.requires_grad_(False)
            self.model_pairs = [[self.encoder, self.encoder_m]]

    state = checkpoints.momentum_state(Momentum())
    assert sorted(state) == ["encoder_m.bias", "encoder_m.weight"]
