"""Bundled model directories, installed as package data: `default/` is the embedded default model.

Found through `gqtok.core.models.find_model` (importlib.resources), never through the repository layout.
"""
