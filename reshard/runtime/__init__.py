"""A small torch runtime that loads reshard's per-rank shards (or the unsharded source) and
generates greedily on a torch.distributed world, so the shards can be compared with the
original model. It reads the manifest; it knows nothing of recipes or plans."""
