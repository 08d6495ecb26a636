"""Load an exported folder with stock transformers (no remote code), as every tool that reads
one does, and continue a prompt greedily."""

import os
from dataclasses import dataclass

import torch

from megatron_emo.convert.hf_folder import check_hf_folder
from megatron_emo.convert.qwen2_moe import ConversionError


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    """The decoded continuation (new tokens only)."""


def load_hf_model(hf_dir: os.PathLike, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM`` on the CPU; raises if ``hf_dir`` is not an exported folder (see
    :func:`~megatron_emo.convert.hf_folder.check_hf_folder`) or any weight is missing, unexpected
    or misshaped."""
    from transformers import AutoModelForCausalLM

    hf_dir = check_hf_folder(hf_dir)
    model, info = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ConversionError(f"{hf_dir} does not load cleanly in transformers: {problems or info['error_msgs']}")
    return model.eval()


def load_hf_tokenizer(hf_dir: os.PathLike):
    """The folder's own ``AutoTokenizer``; raises as :func:`load_hf_model` if it is not an export."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(check_hf_folder(hf_dir)))


def generate(hf_dir: os.PathLike, prompt: str, max_new_tokens: int = 8) -> Generation:
    """Greedy continuation with the folder's own tokenizer and generation_config.json."""
    tokenizer = load_hf_tokenizer(hf_dir)
    model = load_hf_model(hf_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        raise ValueError("the prompt encodes to no tokens")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_ids = inputs["input_ids"][0].tolist()
    new_ids = output[0, len(prompt_ids):].tolist()
    return Generation(prompt_ids, new_ids, tokenizer.decode(new_ids, skip_special_tokens=False))
