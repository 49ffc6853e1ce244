"""The plugin's model-side extensions of LAVIS, activated by ``import lavis_accel``.

- ``vit_types``: ``vit_type: tiny | small`` (and explicit ``vit_width``/``vit_depth``/... keys) for BLIP's ViT.
- ``eva_types``: ``vit_model: eva_vit_tiny`` for BLIP-2's vision encoder.
- ``clip_types``: CLIP ``model_type: ViT-Tiny-16``.
- ``optional_pretrained``: ``load_pretrained: False`` builds a model without loading a checkpoint.
- ``blip_turbo``: the registered ``blip_<task>_turbo`` variants (LAVIS parent + Turbo/ToMe reducer).
- ``blip_madtp``: the registered ``blip_<task>_madtp`` variants (LAVIS parent + ``madtp_model.MadtpModel``).
- ``blip_crossget``: the registered ``blip_<task>_crossget`` variants (LAVIS parent + ``crossget_model.CrossGetModel``).
- ``clip_madtp``: the registered ``clip_madtp`` (LAVIS's CLIP + ``MadtpModel`` + per-block query projections).
- ``clip_crossget``: the registered ``clip_crossget`` (LAVIS's CLIP + ``CrossGetModel``'s cross-token offsets).
- ``dlip``: the DLIP student archs ``dlip_pretrain`` (with its frozen teacher), ``dlip_retrieval``, ``dlip_caption``,
  ``dlip_feature_extractor`` (LAVIS's BLIP classes at ViT-S/16 + bert-small).
- ``pformer_stage0``: P-Former stage 0, ``pformer_opt`` / ``pformer_t5`` (a BERT P-Former trained on sentences alone
  against a frozen OPT / Flan-T5: L_c + L_vq (OPT) + L_lm).
- ``pformer_stages``: P-Former stages 1-2: ``blip2_pformer`` (BLIP-2 stage 1 + L_align), ``blip2_pformer_opt`` /
  ``blip2_pformer_t5`` (stage 2: LM + L_align, ``alignment_only``); their state dicts load into stock BLIP-2.
- ``blip2_opt_answers``: ``Blip2OPT.predict_answers`` (zero-shot VQA by generation) and ``apply_lemmatizer``, added
  only when the installed LAVIS has none (1.0.2 has none; P-Former's zero-shot evaluation needs them).
"""
from lavis_accel.models import clip_types, eva_types, optional_pretrained, vit_types  # noqa: F401
from lavis_accel.models import blip_turbo  # noqa: F401,E402  (after vit_types: the variants build tiny ViTs too)
from lavis_accel.models import blip_madtp  # noqa: F401,E402
from lavis_accel.models import blip_crossget  # noqa: F401,E402
from lavis_accel.models import clip_madtp  # noqa: F401,E402  (after clip_types: it builds the tiny CLIP type too)
from lavis_accel.models import clip_crossget  # noqa: F401,E402  (after clip_types, as clip_madtp)
from lavis_accel.models import dlip  # noqa: F401,E402  (after vit_types: the student is vit_type small)
from lavis_accel.models import blip2_opt_answers  # noqa: F401,E402  (Blip2OPT.predict_answers when LAVIS lacks it)
from lavis_accel.models import pformer_stage0  # noqa: F401,E402  (P-Former stage 0: pformer_opt, pformer_t5)
from lavis_accel.models import pformer_stages  # noqa: F401,E402  (P-Former stages 1-2; after eva_types)
