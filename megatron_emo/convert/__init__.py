"""Conversion between megatron_emo models and Hugging Face formats.

- :mod:`megatron_emo.convert.qwen2_moe`: megatron_emo state dict + config ↔ stock transformers
  ``Qwen2MoeForCausalLM`` state dict + ``Qwen2MoeConfig``.
- :mod:`megatron_emo.convert.hf_folder`: writing and reading HF folders (sharded safetensors).
- :mod:`megatron_emo.convert.megatron_checkpoint`: finding and loading a training checkpoint.
- :mod:`megatron_emo.convert.hf_tokenizer`: the SentencePiece model as HF tokenizer files.
- :mod:`megatron_emo.convert.emo_layout`: allenai's ``EmoForCausalLM`` layout ↔ our export.
- :mod:`megatron_emo.convert.prune`: expert selection and pruned folders.
- :mod:`megatron_emo.convert.hf_generate`: a greedy continuation with stock transformers.

transformers and safetensors are imported lazily (``pip install megatron_emo[hf]``).
"""
