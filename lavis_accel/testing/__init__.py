"""Offline building blocks for tests, the demo and benchmarks: local tokenizers, an offline hub, tiny models.

See ``hub`` for why its environment variables must be set before transformers is imported.
"""
