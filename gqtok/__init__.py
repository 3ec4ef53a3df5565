"""gqtok: the artifact contract shared by training, export and the service.

Everything under this package imports only numpy and pydantic, so the service
(and any client) can rebuild the codebook and read a manifest without torch.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from gqtok import Tokenizer`: the in-process tokenizer (service/tokenizer.py), imported only when asked
    # for, so that `import gqtok.core` stays numpy and pydantic only.
    if name == "Tokenizer":
        from gqtok.service.tokenizer import Tokenizer

        return Tokenizer
    if name == "load_compressor":  # `gqtok.load_compressor("codec")`: compress in process (service/compressor.py)
        from gqtok.service.compressor import load_compressor

        return load_compressor
    raise AttributeError(f"module 'gqtok' has no attribute {name!r}")
