"""The EMO GPT model on megatron-core: spec, layer, MoE layer, attention, norm."""
