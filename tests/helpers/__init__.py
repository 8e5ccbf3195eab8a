"""Shared test helpers: tiny model configs and random weights (micro), quantized and exported micro models."""
