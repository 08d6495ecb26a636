from megatron_emo.recipes import resolve_run


def small_run(tmp_path, *overrides):
    """The tiny recipe cut to 5 one-layer steps on 64-token rows, writing under ``tmp_path``."""
    return resolve_run("tiny", (
        "train.steps=5", "optim.warmup_steps=1", "train.log_interval=1", "train.tensorboard=False",
        "train.eval_interval=0", f"train.output_dir={str(tmp_path / 'run')!r}",
        f"data.cache_dir={str(tmp_path / 'cache')!r}", "data.seq_length=64", "model.num_layers=1", *overrides,
    ))
