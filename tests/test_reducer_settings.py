"""Reducer settings from a ``reducer:`` block, and the reducers registered in LAVIS's processor registry."""
import pytest
import torch
from omegaconf import OmegaConf

import lavis_accel  # first: it makes torchvision importable for LAVIS on CPU-only machines
from lavis.common.registry import registry
from lavis.models.vit import VisionTransformerEncoder
from lavis_accel.errors import SettingError
from lavis_accel.patch import current_settings, is_patched
from lavis_accel.processors import TokenReducer, build_reducer, known_reducers
from lavis_accel.reduce.settings import ReducerSettings


def test_defaults_per_reducer():
    turbo = ReducerSettings.from_config({"name": "turbo"})
    assert turbo.as_dict() == {
        "name": "turbo", "r": 0, "alpha": 5.0, "beta": 1.0, "gamma": 0.0, "threshold": 40, "prop_attn": True,
        "scale_alpha": False,
    }
    tome = ReducerSettings.from_config({"name": "tome", "r": 16})
    assert (tome.r, tome.alpha, tome.threshold, tome.prop_attn) == (16, 0.0, 1, True)


def test_from_an_omegaconf_block_with_every_schedule_form():
    block = OmegaConf.create({"name": "turbo", "r": [4, 2], "alpha": 1, "beta": 0.9, "gamma": 2, "threshold": 100})
    settings = ReducerSettings.from_config(block)
    assert settings.r == [4, 2] and settings.alpha == 1.0 and settings.gamma == 2.0 and settings.threshold == 100
    assert ReducerSettings.from_config({"name": "tome", "r": (8, -1)}).r == (8, -1.0)


def test_a_tome_block_drops_turbo_knobs_but_python_settings_are_strict():
    # a Turbo model's default block switched to tome by its name keeps alpha/beta/gamma after yaml merging
    tome = registry.get_processor_class("tome").from_config({"name": "tome", "r": 4, "alpha": 5, "beta": 2, "gamma": 1})
    assert (tome.settings.alpha, tome.settings.beta, tome.settings.gamma, tome.settings.r) == (0.0, 1.0, 0.0, 4)
    with pytest.raises(SettingError, match="reducer setting 'alpha' is fixed to 0 for 'tome'"):
        ReducerSettings.from_config({"name": "tome", "r": 4, "alpha": 5})


@pytest.mark.parametrize(
    "block, message",
    [
        ({"name": "turbo", "r": -1}, "reducer setting 'r' must be a non-negative integer"),
        ({"name": "turbo", "r": 2.5}, "reducer setting 'r' must be"),
        ({"name": "turbo", "r": "30"}, "reducer setting 'r' must be"),
        ({"name": "turbo", "r": True}, "reducer setting 'r' must be"),
        ({"name": "turbo", "r": [3, -1]}, "reducer setting 'r' must be"),
        ({"name": "turbo", "r": (3, "up")}, "reducer setting 'r' must be"),
        ({"name": "turbo", "alpha": -0.5}, "reducer setting 'alpha' must be >= 0"),
        ({"name": "turbo", "beta": "x"}, "reducer setting 'beta' must be a finite number"),
        ({"name": "turbo", "threshold": 0}, "reducer setting 'threshold' must be an integer >= 1"),
        ({"name": "turbo", "threshold": 40.5}, "reducer setting 'threshold' must be an integer >= 1"),
        ({"name": "turbo", "prop_attn": "yes"}, "reducer setting 'prop_attn' must be True or False"),
        ({"name": "turbo", "scale_alpha": 1}, "reducer setting 'scale_alpha' must be True or False"),
        ({"name": "tome", "scale_alpha": True}, "reducer setting 'scale_alpha' is for 'turbo'"),
        ({"name": "turbo", "ratio": 0.5}, "reducer setting 'ratio' is not known for 'turbo'"),
        ({"name": "madness"}, "reducer name 'madness' is not known: use one of tome, turbo"),
        ({"r": 3}, "reducer name None is not known"),
    ],
)
def test_bad_settings_are_refused_in_one_line(block, message):
    with pytest.raises(ValueError, match=message) as error:
        ReducerSettings.from_config(block)
    assert isinstance(error.value, SettingError) and "\n" not in str(error.value)


def test_non_mapping_config_is_refused():
    with pytest.raises(SettingError, match="reducer config must be a mapping, got list"):
        ReducerSettings.from_config([1, 2])


def test_reducers_are_registered_lavis_processors():
    assert known_reducers() == ["crossget", "madtp", "tome", "turbo"]
    for name in ("tome", "turbo"):
        processor_class = registry.get_processor_class(name)
        assert issubclass(processor_class, TokenReducer)
        assert processor_class.from_config().settings == ReducerSettings.from_config({"name": name})
    assert registry.get_processor_class("turbo")().build(r=7).settings.r == 7  # LAVIS's build(**kwargs) path


def test_build_reducer_applies_the_block_to_a_model():
    torch.manual_seed(0)
    vit = VisionTransformerEncoder(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2).eval()
    block = OmegaConf.create({"name": "turbo", "r": 3, "alpha": 2, "threshold": 1})
    assert build_reducer(block)(vit) is vit
    assert is_patched(vit) and current_settings(vit).alpha == 2.0
    with torch.no_grad():
        assert vit(torch.randn(1, 3, 64, 64)).shape[1] == 17 - 6
    lavis_accel.remove(vit)


def test_build_reducer_refuses_unknown_and_non_reducer_names():
    with pytest.raises(SettingError, match="reducer name 'fast' is not known: use one of crossget, madtp, tome, turbo"):
        build_reducer({"name": "fast"})
    with pytest.raises(SettingError, match="reducer name 'blip_image_eval' is not known"):
        build_reducer({"name": "blip_image_eval"})
    with pytest.raises(SettingError, match="given to the 'tome' reducer"):
        registry.get_processor_class("tome").from_config({"name": "turbo"})
