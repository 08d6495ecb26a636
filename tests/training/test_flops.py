from megatron_emo.recipes import get_recipe
from megatron_emo.training.flops import training_flops_per_token


def test_flagship_flops_per_token():
    config = get_recipe("emo_1b14b").emo_config(vocab_size=100_352, eos_token_id=3, on_gpu=False)
    # 9.31 GFLOP per token, forward and backward, at full depth (the formula: training/flops.py).
    assert abs(training_flops_per_token(config, seq_length=4096, vocab_size=100_352) / 1e9 - 9.311) < 1e-3


def test_proxy_recipe_flops_by_hand():
    config = get_recipe("proxy_1gpu").emo_config(vocab_size=100_352, eos_token_id=3, on_gpu=False)
    # h 2048, 16 heads of 128, s 4096, 127 routed top-7 + 1 shared of 1024, 3 layers, V 100,352.
    layer = 2 * 2048 * (3 * 2048) + 2 * 2048 * 2048 + 4 * 4096 * 2048 + 2 * 2048 * 127 + 8 * 3 * 2 * 2048 * 1024
    expected = 3 * (3 * layer + 2 * 2048 * 100_352)
    assert training_flops_per_token(config, seq_length=4096, vocab_size=100_352) == expected
