"""The maths of token reduction in plain torch (no LAVIS): ToMe's matching and merging, Turbo's informativity."""
from lavis_accel.reduce.attention import attention, cls_attention_row  # noqa: F401
from lavis_accel.reduce.merge import (  # noqa: F401
    bipartite_scores,
    bipartite_soft_matching,
    effective_r,
    merge_wavg,
    parse_r,
    proportional_bias,
    token_schedule,
)
from lavis_accel.reduce.settings import DEFAULTS, KNOWN_REDUCERS, ReducerSettings  # noqa: F401
from lavis_accel.reduce.turbo import (  # noqa: F401
    informativity_matching,
    informativity_scores,
    semantic_penalty,
    semantic_weight,
)
