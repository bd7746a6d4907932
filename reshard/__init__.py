"""reshard: turn a Hugging Face checkpoint into per-rank safetensors shards and prove them."""

import warnings

# numpy is not a dependency; torch warns at import when it is absent, and nothing here needs it.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

__version__ = "0.1.0"
