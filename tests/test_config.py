"""EmoConfig validation (megatron_emo.config): every bad EMO field fails up front, by name."""

import pytest

from megatron_emo.config import ConfigError
from tests.conftest import make_config


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


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(emo_pool_min=9, emo_pool_max=8), "emo_pool_min"),
        (dict(emo_pool_min=1), "emo_pool_min"),  # routed top-k is 2
        (dict(emo_eval_pool=1), "emo_eval_pool"),
        (dict(emo_eos_token_id=-1), "emo_eos_token_id"),
        (dict(emo_eos_token_id=64), "emo_eos_token_id"),  # vocabulary is 64
        (dict(emo_num_shared_experts=9), "emo_num_shared_experts"),
        (dict(emo_num_shared_experts=12), "emo_num_shared_experts"),
        (dict(emo_num_shared_experts=-1), "emo_num_shared_experts"),
        (dict(moe_router_topk=1), "moe_router_topk"),  # 1 shared: zero routed choices
        (dict(moe_router_topk=10), "moe_router_topk"),  # 9 routed choices > 8 routed experts
        (dict(emo_router_mode="standard"), "emo_router_mode"),
        (dict(num_moe_experts=None), "num_moe_experts"),
        (dict(num_moe_experts=0), "num_moe_experts"),
        (dict(emo_lb_loss_weight=-0.1), "emo_lb_loss_weight"),
        (dict(emo_z_loss_weight=-1e-3), "emo_z_loss_weight"),
        (dict(emo_vocab_size=0, emo_eos_token_id=0), "emo_vocab_size"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as excinfo:
        make_config(**overrides)
    # The message leads with the offending field and its value.
    assert str(excinfo.value).startswith(f"{field}="), str(excinfo.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        make_config(emo_pool_min=100)


def test_pool_max_above_routed_experts_is_valid():
    # A pool of at least the routed experts masks nothing: allowed.
    assert make_config(emo_pool_max=1000).emo_pool_max == 1000


def test_eval_pool_equal_to_topk_is_valid():
    assert make_config(emo_eval_pool=2, emo_pool_min=2).emo_eval_pool == 2
