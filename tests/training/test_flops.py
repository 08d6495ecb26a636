from megatron_emo.recipes import get_recipe
from megatron_emo.training.flops import training_flops_per_token


def test_flagship_flops_per_token():
    config = get_recipe("emo_1b14b").emo_config(vocab_size=100_352, eos_token_id=3, on_gpu=False)
    # DESIGN.md §5: 9.31 GFLOP per token, forward and backward, at full depth.
    assert abs(training_flops_per_token(config, seq_length=4096, vocab_size=100_352) / 1e9 - 9.311) < 1e-3
