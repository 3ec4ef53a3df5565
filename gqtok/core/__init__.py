"""gqtok.core: the artifact contract that training, export, the service and the generator share.

It depends on numpy and pydantic only (plus constriction, imported inside the entropy coder, and numba, which
compiles the GQ search), so a client or the service can rebuild a codebook, read a manifest, select tokens and
decompress a file without torch. Modules: codebook (the seeded Gaussian codebook), layout (token grouping,
sequence order, the pad rule), select (exact GQ selection) and kdtree (its search), manifest and artifact (a digest-checked model directory), models (where model
directories are found), priors and bitstream (entropy coding).

Words, each with one meaning everywhere in gqtok:
  encode / decode          the networks: image -> latent posterior (mu, logvar); latent -> image
  select                   GQ: posterior -> codeword ids
  tokenize / detokenize    image -> token ids (encode, then select); ids -> image (codewords, then decode)
  compress / decompress    token grid or image <-> bytes of the gqtok format (entropy coding under a prior)
  fit                      how an image's sides become multiples of f (pad, crop, exact); nothing resamples
"""
