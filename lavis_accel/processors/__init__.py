"""LAVIS processors the plugin registers: the token reducers (``tome``, ``turbo``)."""
from lavis_accel.processors.reducers import TokenReducer, build_reducer, known_reducers  # noqa: F401
