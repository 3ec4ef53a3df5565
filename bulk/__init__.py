"""Pre-tokenizing datasets: image files -> token shards (.npy), an index and meta.json (docs/pretokenize.md).

preprocess.py says what becomes of each file (resize and crop, augmentation views, or the service's fit);
shards.py runs one shard and the local engine; ray_engine.py runs the same shards on Ray Data. Shards are read
back by gqtok.core.shards.
"""
