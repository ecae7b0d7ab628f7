"""Measurements of a (pruned) model: perplexity, latency, per-layer sensitivity, and the data they use."""
