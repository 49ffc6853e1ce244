"""Token reducers as LAVIS processors: ``tome``, ``turbo``, ``madtp`` and ``crossget``, built from a ``reducer:`` config block.

A reducer processor is called on a model and returns it patched in place, so a model's ``from_config`` can end
with ``build_reducer(cfg.reducer)(model)``.
"""
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor

from lavis_accel.errors import SettingError
from lavis_accel.models.madtp_model import START_TEMPERATURE, MadtpModel
from lavis_accel.patch import crossget as crossget_patch
from lavis_accel.patch import madtp as madtp_patch
from lavis_accel.patch.vit import apply_settings
from lavis_accel.reduce.settings import TURBO_ONLY, ReducerSettings, plain_config
from lavis_accel.registration import register_processor


class TokenReducer(BaseProcessor):
    """A processor that applies its reducer settings to a model (``reducer(model)`` returns the patched model)."""

    reducer_name = None

    def __init__(self, settings: ReducerSettings = None):
        super().__init__()
        self.settings = settings or ReducerSettings.from_config({"name": self.reducer_name})
        if self.settings.name != self.reducer_name:
            raise SettingError(f"reducer name {self.settings.name!r} given to the {self.reducer_name!r} reducer")

    def __call__(self, model):
        return apply_settings(model, self.settings)

    @classmethod
    def from_config(cls, cfg=None):
        values = {"name": cls.reducer_name, **({} if cfg is None else plain_config(cfg))}
        return cls(ReducerSettings.from_config(values))

    @classmethod
    def block_settings(cls, cfg) -> dict:
        """A ``reducer:`` block's settings without its ``name``, which must be this reducer's (when given)."""
        values = {} if cfg is None else plain_config(cfg)
        name = values.pop("name", cls.reducer_name)
        if name != cls.reducer_name:
            raise SettingError(f"reducer name {name!r} given to the {cls.reducer_name!r} reducer")
        return values


@register_processor("tome")
class ToMeReducer(TokenReducer):
    """ToMe: bipartite soft matching on attention keys, size-weighted merges, proportional attention."""

    reducer_name = "tome"

    @classmethod
    def from_config(cls, cfg=None):
        """A ``reducer:`` block switched to ``name: tome`` over a Turbo model's default block still carries Turbo's
        ``alpha``/``beta``/``gamma`` after yaml merging: they are dropped here (``lavis_accel.apply`` stays strict)."""
        values = {} if cfg is None else plain_config(cfg)
        return super().from_config({k: v for k, v in values.items() if k not in TURBO_ONLY})


@register_processor("turbo")
class TurboReducer(TokenReducer):
    """Turbo: ToMe's matching driven by informativity (redundancy minus [CLS]-attention semantic value)."""

    reducer_name = "turbo"


@register_processor("madtp")
class MadtpReducer(TokenReducer):
    """MADTP: alignment-guided dynamic token pruning at tau ``temperature`` (``reducer: {name: madtp, temperature}``).

    On a registered MADTP variant it patches every tower with the model's own codebook, tau being the loaded
    checkpoint's when it holds one (``MadtpModel.attach_madtp``); on any other model, ``patch.madtp.apply``.
    """

    reducer_name = "madtp"

    def __init__(self, temperature: float = START_TEMPERATURE):
        BaseProcessor.__init__(self)  # no ToMe/Turbo settings: MADTP's only setting is tau
        self.temperature = madtp_patch.checked_temperature(temperature)

    def __call__(self, model):
        if isinstance(model, MadtpModel):
            return model.attach_madtp(self.temperature)
        return madtp_patch.apply(model, temperature=self.temperature)

    @classmethod
    def from_config(cls, cfg=None):
        values = cls.block_settings(cfg)
        unknown = sorted(set(values) - {"temperature"})
        if unknown:
            raise SettingError(f"reducer setting {unknown[0]!r} is not known for 'madtp': use temperature")
        return cls(**values)


@register_processor("crossget")
class CrossGetReducer(TokenReducer):
    """CrossGET: cross-guided complete-graph merging, ``rv`` merges per image block and ``rl`` per text block
    (``reducer: {name: crossget, rv: 16, rl: 0}``; ``eot_guard`` for CLIP's text). The settings are checked against
    the model's towers when it is applied (``patch.crossget.apply``); a CrossGET variant's own offsets are used."""

    reducer_name = "crossget"

    def __init__(self, **settings):
        BaseProcessor.__init__(self)
        unknown = sorted(set(settings) - set(crossget_patch.KNOWN_SETTINGS))
        if unknown:
            raise SettingError(f"reducer setting {unknown[0]!r} is not known for 'crossget': use "
                               f"{', '.join(crossget_patch.KNOWN_SETTINGS)}")
        self.settings = settings

    def __call__(self, model):
        return crossget_patch.apply(model, **self.settings)

    @classmethod
    def from_config(cls, cfg=None):
        return cls(**cls.block_settings(cfg))


def known_reducers():
    """Names of the token reducers registered in LAVIS's processor registry."""
    mapping = registry.mapping["processor_name_mapping"]
    return sorted(name for name, cls in mapping.items() if issubclass(cls, TokenReducer))


def build_reducer(cfg) -> TokenReducer:
    """The registered reducer processor named by ``cfg.name``, built from the rest of the block."""
    name = plain_config(cfg).get("name")
    processor_class = registry.get_processor_class(name) if isinstance(name, str) else None
    if processor_class is None or not issubclass(processor_class, TokenReducer):
        raise SettingError(f"reducer name {name!r} is not known: use one of {', '.join(known_reducers())}")
    return processor_class.from_config(cfg)

