"""A small torch runtime that loads reshard's per-rank shards (or the unsharded source) and
generates greedily, so the shards can be compared with the original model."""
