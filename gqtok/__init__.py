"""gqtok: the artifact contract shared by training, export and the service.

Everything under this package imports only numpy and pydantic, so the service
(and any client) can rebuild the codebook and read a manifest without torch.
"""

__version__ = "0.1.0"
