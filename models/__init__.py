"""Bundled model directories, installed as package data: `default/` is the embedded default model (one 16-bit
token per 8x8 patch), `f16/` the 256-token model (one per 16x16 patch), `codec/` the discretized-VAE codec.

Found through `gqtok.core.models.find_model` (importlib.resources), never through the repository layout.
"""
