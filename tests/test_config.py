"""EmoConfig (megatron_emo.config): expert counting, and the one builder of a run's config."""

import pytest
import torch

from megatron_emo.config import MODEL_DEFAULTS, TOKENIZER_FIELDS, ConfigError, build_emo_config
from tests.conftest import SMALL_CONFIG, make_config

RUN_MODEL = {name: value for name, value in SMALL_CONFIG.items() if name not in TOKENIZER_FIELDS}


def test_valid_config_counts_routed_experts():
    config = make_config()
    assert config.num_routed_experts == 8
    assert config.routed_topk == 2


def test_no_shared_experts():
    config = make_config(emo_num_shared_experts=0, moe_router_topk=2)
    assert config.num_routed_experts == 9
    assert config.routed_topk == 2


def test_emo_shape_counts():
    config = make_config(
        num_moe_experts=128, moe_router_topk=8, emo_pool_min=8, emo_pool_max=128, emo_eval_pool=32
    )
    assert (config.num_routed_experts, config.routed_topk) == (127, 7)


def test_eval_pool_none_and_topk_mode_are_valid():
    assert make_config(emo_eval_pool=None).emo_eval_pool is None
    assert make_config(emo_router_mode="topk").emo_router_mode == "topk"


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        make_config(emo_pool_min=100)


def test_pool_max_above_routed_experts_is_valid():
    # A pool of at least the routed experts masks nothing: allowed.
    assert make_config(emo_pool_max=1000).emo_pool_max == 1000


def test_eval_pool_equal_to_topk_is_valid():
    assert make_config(emo_eval_pool=2, emo_pool_min=2).emo_eval_pool == 2


def test_model_defaults_are_the_run_settable_fields():
    assert MODEL_DEFAULTS["emo_pool_min"] == 8 and MODEL_DEFAULTS["normalization"] == "RMSNorm"
    assert not set(TOKENIZER_FIELDS) & set(MODEL_DEFAULTS)


@pytest.mark.parametrize("on_gpu, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_builder_picks_the_precision_of_the_device(on_gpu, dtype):
    config = build_emo_config(RUN_MODEL, vocab_size=64, eos_token_id=2, on_gpu=on_gpu)
    assert (config.bf16, config.params_dtype, config.pipeline_dtype) == (on_gpu, dtype, dtype)
    assert (config.emo_vocab_size, config.emo_eos_token_id) == (64, 2)
    # The model section's bf16 wins over the device's.
    fp32 = build_emo_config({**RUN_MODEL, "bf16": False}, vocab_size=64, eos_token_id=2, on_gpu=True)
    assert fp32.params_dtype == torch.float32


def test_megatron_cores_own_checks_become_config_errors():
    with pytest.raises(
        ConfigError,
        match=r"model: num_attention_heads \(2\) must be a multiple of tensor_model_parallel_size \(3\)",
    ):
        build_emo_config({**RUN_MODEL, "tensor_model_parallel_size": 3}, vocab_size=64, eos_token_id=2, on_gpu=False)
