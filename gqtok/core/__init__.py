"""gqtok.core: the artifact contract that training, export, the service and the generator share.

It depends on numpy and pydantic only (plus constriction, imported inside the entropy coder), so a client or
the service can rebuild a codebook, read a manifest, select tokens and decode a compressed file without torch.
Modules: codebook (the seeded Gaussian codebook), layout (token grouping, sequence order, the pad rule),
select (GQ selection in numpy), manifest and artifact (a digest-checked model directory), models (where model
directories are found), priors and bitstream (entropy coding).
"""
