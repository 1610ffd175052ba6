"""turbo-cluster: pipeline-parallel LLM inference on MLX with a TurboQuant KV cache."""

__version__ = "0.1.0"
