"""Load an exported folder with stock transformers (no remote code) and continue a prompt greedily."""

import os
from dataclasses import dataclass

import torch

from megatron_emo.convert.qwen2_moe import ConversionError


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    """The decoded continuation (new tokens only)."""


def load_hf_model(hf_dir: os.PathLike, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM`` on the CPU; raises if any weight is missing, unexpected or misshaped."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ConversionError(f"{hf_dir} does not load cleanly in transformers: {problems or info['error_msgs']}")
    return model.eval()


def generate(hf_dir: os.PathLike, prompt: str, max_new_tokens: int = 8) -> Generation:
    """Greedy continuation with the folder's own tokenizer and generation_config.json."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = load_hf_model(hf_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        raise ValueError("the prompt encodes to no tokens")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_ids = inputs["input_ids"][0].tolist()
    new_ids = output[0, len(prompt_ids):].tolist()
    return Generation(prompt_ids, new_ids, tokenizer.decode(new_ids, skip_special_tokens=False))
