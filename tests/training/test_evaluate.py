import json
import math

import pytest

from megatron_emo.training import loop
from megatron_emo.training.evaluate import eval_pool, pools_to_evaluate
from tests.conftest import make_config
from tests.training.conftest import small_run


def test_pool_settings():
    assert pools_to_evaluate(make_config(emo_eval_pool=4)) == {"pool4": 4, "no_pool": None}
    assert pools_to_evaluate(make_config(emo_eval_pool=None)) == {"no_pool": None}
    assert pools_to_evaluate(make_config(emo_router_mode="topk")) == {"no_pool": None}


def test_eval_pool_is_restored():
    config = make_config(emo_eval_pool=4)
    with pytest.raises(RuntimeError), eval_pool(config, None):
        assert config.emo_eval_pool is None
        raise RuntimeError
    assert config.emo_eval_pool == 4


def test_validation_loss_per_domain_with_and_without_pool(tmp_path):
    loop.train(small_run(tmp_path, "train.eval_interval=2", "train.eval_samples=16", "model.emo_eval_pool=8"))
    records = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    columns = {"step"} | {f"eval/{d}/{p}" for d in ("code", "docs", "prose") for p in ("pool8", "no_pool")}
    for record in records:
        assert set(record) == columns
        assert all(math.isfinite(v) and 3 < v < 9 for k, v in record.items() if k != "step")
    # The model learns between evaluations.
    assert records[-1]["eval/docs/no_pool"] < records[0]["eval/docs/no_pool"]

