import dataclasses
import json

import pytest

from megatron_emo.config import ConfigError
from megatron_emo.recipes import RECIPES, ModelSettings, RunConfig, apply_override, get_recipe
from megatron_emo.validate import validate_run


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_a_valid_config(name):
    run = get_recipe(name)
    validate_run(run)
    config = run.emo_config(vocab_size=100_352, eos_token_id=3, on_gpu=False)
    assert config.num_routed_experts + config.emo_num_shared_experts == config.num_moe_experts


def test_flagship_shapes():
    config = get_recipe("emo_1b14b").emo_config(vocab_size=100_352, eos_token_id=3, on_gpu=True)
    assert (config.num_layers, config.hidden_size, config.num_moe_experts) == (16, 2048, 128)
    assert (config.num_routed_experts, config.routed_topk, config.moe_ffn_hidden_size) == (127, 7, 1024)
    assert (config.emo_pool_min, config.emo_pool_max, config.emo_eval_pool) == (8, 128, 32)
    assert config.bf16 and get_recipe("emo_1b14b").optim.lr == 4e-3
    assert get_recipe("stdmoe_1b14b").model["emo_router_mode"] == "topk"


def test_overrides_parse_by_type():
    run = get_recipe("tiny")
    apply_override(run, "model.num_layers=2")
    apply_override(run, "model.emo_router_mode=topk")
    apply_override(run, "model.emo_eval_pool=None")
    apply_override(run, "optim.lr=1")  # an int where a float is expected is fine
    apply_override(run, "train.tensorboard=False")
    assert run.model["num_layers"] == 2 and run.model["emo_router_mode"] == "topk"
    assert run.model["emo_eval_pool"] is None and run.optim.lr == 1.0 and run.train.tensorboard is False


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("model.num_layer=2", "num_layer"),
        ("model.num_layers=two", "model.num_layers"),
        ("train.tensorboard=1", "train.tensorboard"),
        ("optim.learning_rate=1", "optim.learning_rate"),
        ("nosection.x=1", "nosection"),
        ("train.steps", "section.field=value"),
    ],
)
def test_bad_overrides_name_the_field(assignment, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(get_recipe("tiny"), assignment)


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="tiny"):
        get_recipe("huge")


def test_model_section_checks_names_and_types_however_it_is_set():
    with pytest.raises(ConfigError, match=r"model.num_layer is not an EmoConfig field \(did you mean num_layers"):
        RunConfig(name="x", model=dict(num_layer=2))
    model = ModelSettings(num_layers=2)
    with pytest.raises(ConfigError, match="model.hidden_size: expected int"):
        model.update(hidden_size="wide")
    with pytest.raises(ConfigError, match="model.emo_pool_max"):
        model |= {"emo_pool_max": 1.5}
    with pytest.raises(ConfigError, match="model.bf16: expected a boolean"):
        model.setdefault("bf16", 1)
    model["init_method_std"] = 1  # an int where a float is expected is fine
    assert model == {"num_layers": 2, "init_method_std": 1.0}


def test_model_section_round_trips_through_run_config_json():
    run = get_recipe("stdmoe_1b14b")
    saved = json.loads(json.dumps(dataclasses.asdict(run), default=str))
    # Only the fields the run set, as a flat mapping.
    assert saved["model"] == dict(run.model) and "hidden_dropout" not in saved["model"]
    back = RunConfig(name=saved["name"], model=saved["model"])
    assert isinstance(back.model, ModelSettings) and back.model == run.model
    assert isinstance(dataclasses.replace(run, model={"num_layers": 1}).model, ModelSettings)


def test_wsd_schedule_is_constant_then_linear_to_min_lr():
    import torch

    from megatron_emo.training.optimizer import _scheduler

    run = get_recipe("tiny")
    for assignment in ("optim.schedule='wsd'", "optim.anneal_steps=4", "optim.warmup_steps=2", "train.steps=10"):
        apply_override(run, assignment)
    validate_run(run)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = _scheduler(optimizer, run.optim, run.train.steps)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    lrs.append(optimizer.param_groups[0]["lr"])
    lr, min_lr = run.optim.lr, run.optim.min_lr
    assert lrs[0] == 0.0 and lrs[2:7] == [lr] * 5
    assert lrs[6] > lrs[7] > lrs[8] > lrs[9] > lrs[10] and abs(lrs[10] - min_lr) < 1e-12
    assert abs(lrs[8] - (min_lr + (lr - min_lr) * 0.5)) < 1e-12  # linear: halfway at half the anneal
