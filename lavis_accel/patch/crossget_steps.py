"""CrossGET's steps (``patch.steps`` protocol): the cross token, cross-guided complete-graph matching, ensembling.

One step per tower. Every tower carries a *cross token* last: appended before block 0, replaced before each block
``i`` by ``stopgrad(source) + offsets[i]`` (the learnable ``[1, depth, width]`` offsets, zero-initialised), and
dropped after the last block's merge (nothing reads it after that block: the [CLS]/EOT outputs do not depend on
it, and the MLP is per token). The per-block cross tokens are kept in ``cross_tokens`` for the loss.

- ``CrossGetStep`` (image towers: CLIP's ``visual``, BLIP's ViT): the cross token starts as a copy of [CLS]; its
  source is its own previous output; its query scores importance; every token sees it (an extra key, so even
  ``r = 0`` changes the output, as in the reference).
- ``EotCrossGetStep`` (CLIP's causal text): the cross token starts as the EOT's embedding; its source is the hidden
  state at the current EOT; the EOT's query scores importance; the causal mask hides it from every other token.
  The EOT is found through merged token ids (size-weighted means; the EOT's id is the largest and never merged).
- Every block's attention runs in the reference's op order (``AttentionNeeds.reference_order``; the CLIP binding
  honours it, BLIP's bindings, with no reference to match, keep SDPA): the ranking of near-equal similarities
  decides which tokens merge, and with SDPA's last bits a few blocks in twelve merge differently from the
  reference. In that order both towers equal the official code's outputs bit for bit in float64.
- ``BertCrossGetStep`` (BLIP's text encoder, unimodal ``text`` passes; derived design, not reference code): as the
  CLIP text with [CLS] in the EOT's role; the cross token is hidden as a key (masked like padding), so ``r = 0``
  leaves the text output unchanged; real tokens and padding never merge with each other.
"""
from typing import Optional

import torch

from lavis_accel.patch.steps import AttentionNeeds, AttentionSeen, ReductionStep
from lavis_accel.reduce import crossget
from lavis_accel.reduce.merge import at_least_float32, proportional_bias


class CrossGetStep(ReductionStep):
    """CrossGET in an image tower: ``r`` merges per block, guided by the cross token (see the module docstring)."""

    tracks_eot = False
    sided = False  # whether matching keeps two sides of the tokens apart (``sides``)

    def __init__(self, offsets: torch.Tensor, r: int):
        self.offsets = offsets
        self.r = r
        self.depth = offsets.shape[1]
        self.start_forward()

    def start_forward(self):
        self.size = None
        self.cross_tokens = []
        self._r = 0

    def enter(self, index: int, x: torch.Tensor, valid=None):
        if index == 0:
            x, valid = self.append_cross_token(x, valid)
        cross = self.cross_source(x).detach() + self.offsets[:, index].to(x.dtype)
        self.cross_tokens.append(cross)
        return torch.cat([x[:, :-1], cross[:, None]], dim=1), valid

    def append_cross_token(self, x: torch.Tensor, valid):
        return torch.cat([x, x[:, :1]], dim=1), valid

    def cross_source(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]

    def query(self, seen: AttentionSeen) -> torch.Tensor:
        return seen.queries[:, -1]

    def needs(self, index: int, x: torch.Tensor, valid=None) -> AttentionNeeds:
        self._r = crossget.effective_r(x.shape[1], self.r, self.tracks_eot, self.sided)
        bias = proportional_bias(self.size) if self.r > 0 else None
        return AttentionNeeds(bias=bias, projections=self._r > 0, reference_order=True)

    def reduce(self, index: int, x: torch.Tensor, seen: AttentionSeen, valid=None):
        if self._r > 0:
            matching = crossget.complete_graph_matching(seen.projected_keys, self.query(seen), self._r,
                                                        self.eot_index(), self.sides(valid))
            x, valid = self.merge(matching, x, valid)
        if index == self.depth - 1:
            x, valid = self.drop_cross_token(x, valid)
        return x, valid

    def eot_index(self) -> Optional[torch.Tensor]:
        return None

    def sides(self, valid) -> Optional[torch.Tensor]:
        return None

    def merge(self, matching: crossget.Matching, x: torch.Tensor, valid):
        x, self.size = crossget.ensemble(matching, x, self.size)
        return x, valid

    def drop_cross_token(self, x: torch.Tensor, valid):
        return x[:, :-1], (None if valid is None else valid[:, :-1])

    def describe(self, num_tokens: int) -> str:
        counts = crossget.token_schedule(num_tokens + 1, self.r, self.depth, self.tracks_eot, self.sided)
        return f"crossget (r={self.r}) keeps tokens (cross token included) " + " -> ".join(map(str, counts))


class EotCrossGetStep(CrossGetStep):
    """CrossGET in CLIP's causal text tower (see the module docstring).

    ``eot_guard``: tokens before and after the EOT never merge with each other. The reference lets a word merge into
    a padding token behind the EOT (where the causal mask hides it from the EOT) and padding into words; the default
    keeps that, so the reference's numbers reproduce.
    """

    tracks_eot = True

    def __init__(self, offsets: torch.Tensor, r: int, eot_guard: bool = False):
        super().__init__(offsets, r)
        self.eot_guard = eot_guard
        self.sided = eot_guard

    def start_forward(self):
        super().start_forward()
        self.token_ids = None

    def start_text(self, text: torch.Tensor):
        """Take the token ids ``[B, L]`` of the forward; the tower hides no key but by causality (``None``)."""
        reference = self.offsets
        dtype = reference.dtype if reference.dtype == torch.float64 else torch.float32
        self.token_ids = text.to(dtype)
        return None

    @property
    def eot(self) -> torch.Tensor:
        """The EOT's current index ``[B]`` (the largest token id)."""
        return self.token_ids.argmax(dim=-1)

    def eot_index(self) -> torch.Tensor:
        return self.eot

    def append_cross_token(self, x: torch.Tensor, valid):
        self.token_ids = torch.cat([self.token_ids, self.token_ids[:, :1]], dim=1)  # [SOT]'s id: below the EOT's
        return torch.cat([x, self.cross_source(x)[:, None]], dim=1), valid

    def cross_source(self, x: torch.Tensor) -> torch.Tensor:
        return x[torch.arange(x.shape[0], device=x.device), self.eot]

    def query(self, seen: AttentionSeen) -> torch.Tensor:
        queries = seen.queries
        return queries[torch.arange(queries.shape[0], device=queries.device), self.eot]

    def sides(self, valid) -> Optional[torch.Tensor]:
        if not self.eot_guard:
            return None
        positions = torch.arange(self.token_ids.shape[1], device=self.token_ids.device)
        return positions > self.eot[:, None]

    def merge(self, matching: crossget.Matching, x: torch.Tensor, valid):
        size = self.size if self.size is not None else at_least_float32(torch.ones_like(x[..., :1]))
        x, self.size = crossget.ensemble(matching, x, size)
        self.token_ids = crossget.merge_token_ids(matching, self.token_ids, size.to(self.token_ids.dtype),
                                                  self.size.to(self.token_ids.dtype))
        return x, valid

    def drop_cross_token(self, x: torch.Tensor, valid):
        self.token_ids = self.token_ids[:, :-1]
        return super().drop_cross_token(x, valid)


class BertCrossGetStep(CrossGetStep):
    """CrossGET in BLIP's BERT text encoder, unimodal ``text`` passes only (see the module docstring)."""

    text_modes = ("text",)
    sided = True  # real tokens and padding

    def append_cross_token(self, x: torch.Tensor, valid):
        hidden = torch.zeros_like(valid[:, :1])
        return torch.cat([x, x[:, :1]], dim=1), torch.cat([valid, hidden], dim=1)

    def cross_source(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]

    def query(self, seen: AttentionSeen) -> torch.Tensor:
        return seen.queries[:, 0]

    def sides(self, valid) -> torch.Tensor:
        return valid

    def merge(self, matching: crossget.Matching, x: torch.Tensor, valid):
        x, valid = super().merge(matching, x, valid)
        merged_valid = crossget.merge_sum(matching, valid[..., None].to(self.size.dtype))[..., 0] > 0
        return x, merged_valid
