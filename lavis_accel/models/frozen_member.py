"""A model that holds a frozen module with weights of its own: DLIP's teacher, P-Former's P-Former in stages 1-2.

Such a member comes from its own checkpoint (``teacher.pretrained``, ``pretrained_stage0``, the LLM's hub weights),
never from the model's: it stays in eval mode whatever ``train()`` the runner calls (no dropout in the targets it
gives; ``FROZEN_MEMBER_IN_EVAL = False`` keeps a parent's behaviour of training it in train mode), it is left out of
the model's state dict (LAVIS's epoch runner drops frozen parameters by name, which misses tied weights and
buffers; ``runner_iter`` saves everything), and loading a state keeps the member as it was built.
"""


class FrozenMemberMixin:
    """Mixin for a LAVIS model class whose attribute ``FROZEN_MEMBER`` (None or absent: no member) is frozen."""

    FROZEN_MEMBER = None  # the attribute's name, e.g. "teacher"
    FROZEN_MEMBER_IN_EVAL = True  # False: the member follows the model's train()/eval() (its dropout stays on)

    def _frozen_member(self):
        return getattr(self, self.FROZEN_MEMBER, None) if self.FROZEN_MEMBER else None

    def train(self, mode=True):
        """Train the model; the frozen member always stays in eval mode."""
        super().train(mode)
        member = self._frozen_member()
        if member is not None and self.FROZEN_MEMBER_IN_EVAL:
            member.eval()
        return self

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The model's state without the frozen member's."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.FROZEN_MEMBER:
            member_prefix = f"{prefix}{self.FROZEN_MEMBER}."
            for key in [key for key in state if key.startswith(member_prefix)]:
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        """Load a model state; the frozen member keeps the weights it was built with (any of its keys in
        ``state_dict`` are ignored)."""
        member = self._frozen_member()
        if member is not None:
            own = {f"{self.FROZEN_MEMBER}.{key}": value for key, value in member.state_dict().items()}
            state_dict = {**state_dict, **own}
        return super().load_state_dict(state_dict, strict=strict, **kwargs)
