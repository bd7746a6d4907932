"""reshard: turn a Hugging Face checkpoint into per-rank safetensors shards and prove them."""

__version__ = "0.1.0"
