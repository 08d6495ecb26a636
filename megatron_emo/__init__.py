"""megatron_emo: EMO document-pooled mixture-of-experts language models on megatron-core."""

__version__ = "0.1.0"
