"""Data: the demo corpus, tokenizers, and packed training samples."""
