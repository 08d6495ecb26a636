"""Conversion between megatron_emo models and Hugging Face formats.

- :mod:`megatron_emo.convert.qwen2_moe`: megatron_emo state dict + config ↔ stock transformers
  ``Qwen2MoeForCausalLM`` state dict + ``Qwen2MoeConfig``, and writing/reading HF folders.
- :mod:`megatron_emo.convert.hf_tokenizer`: the SentencePiece model as HF tokenizer files.

transformers and safetensors are imported lazily (``pip install megatron_emo[hf]``).
"""
