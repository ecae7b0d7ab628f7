"""The bottom layer: loading a model, its numerics, its family's layout, and removing layers from it.

Nothing here imports the measurements (`evaluators/`) or the engine (the rest of `search/`);
both build on it (tests/test_layers.py keeps it so).
"""
