"""Import a Hugging Face folder (our Qwen2-MoE export, or EMO's own ``EmoForCausalLM`` layout) for
training.

    python tools/convert_from_hf.py --hf runs/tiny/hf --recipe tiny --output runs/tiny-continued/init
    python -m megatron_emo.train --recipe tiny --set train.init_from="'runs/tiny-continued/init'" \
        --set train.output_dir="'runs/tiny-continued'" ...

Writes a weights-only megatron_emo checkpoint folder (verified like any checkpoint, with the
run config and the folder's tokenizer.model) and prints the ``--set`` overrides that make the
recipe's model match the imported one, plus the command that starts training from it in a
folder of its own (the output's parent, or ``<output>-run`` beside it when the parent holds a
run). ``--force`` replaces only a weights-only checkpoint folder such as this tool writes (every
file listed in its manifest, no optimizer state, not inside a run's ``checkpoints``). The
document pools are restored from the export's ``emo_metadata`` when present.

Exit codes: 0 done; 2 bad input (not a Qwen2-MoE folder the model can express, a missing shard,
an existing output without --force).
"""

import argparse
import json
import sys
from pathlib import Path

from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()  # before megatron-core is imported

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="the Hugging Face folder (config.json + safetensors)")
    parser.add_argument("--recipe", required=True, help="the recipe to train with (its data, optimizer and schedule)")
    parser.add_argument("--output", required=True, help="the checkpoint folder to write")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    add_verbose_argument(parser)
    return parser.parse_args(argv)


def model_overrides(recipe_model: dict, imported_model: dict) -> dict:
    """The imported model fields that differ from the recipe's (or from EmoConfig's defaults)."""
    from megatron_emo.config import MODEL_DEFAULTS

    return {name: value for name, value in imported_model.items()
            if recipe_model.get(name, MODEL_DEFAULTS[name]) != value}


def convert(args) -> list[str]:
    """Write the checkpoint; return the ``--set`` overrides to train from it."""
    from transformers import AutoConfig, Qwen2MoeConfig

    from megatron_emo.checkpoint.store import write_weights_checkpoint
    from megatron_emo.convert import hf_folder
    from megatron_emo.convert.emo_layout import from_emo_layout, qwen_config_from_emo
    from megatron_emo.convert.qwen2_moe import from_hf_config, from_hf_state_dict
    from megatron_emo.recipes import get_recipe
    from megatron_emo.training.cpu_mode import megatron_device
    from megatron_emo.training.distributed import process_group

    hf_dir, output = hf_folder.check_hf_folder(args.hf), Path(args.output)
    if output.exists():
        if not args.force:
            raise FileExistsError(f"{output} exists: pass --force to replace it")
        if not _is_weights_checkpoint(output):
            raise FileExistsError(f"{output} is not a checkpoint folder this tool wrote: --force replaces only "
                                  "those; choose another --output")
    raw = json.loads((hf_dir / "config.json").read_text())
    tensors = hf_folder.read_hf_weights(hf_dir)
    if raw.get("model_type") == "emo":  # allenai's EmoForCausalLM layout
        qwen = qwen_config_from_emo(raw)
        tensors = from_emo_layout(tensors, num_routed=qwen["num_experts"], num_shared=raw.get("num_shared_experts", 1))
        hf_config = Qwen2MoeConfig(**qwen)
    else:
        hf_config = AutoConfig.from_pretrained(hf_dir)
    imported = from_hf_config(hf_config)
    config = imported.emo_config()
    state = from_hf_state_dict(tensors, config, imported.gpt)
    run = get_recipe(args.recipe)
    overrides = {f"model.{k}": v for k, v in model_overrides(run.model, imported.model).items()}
    gpt = {"gpt.rotary_base": imported.gpt.rotary_base, "gpt.share_embeddings": imported.gpt.share_embeddings}
    overrides.update({k: v for k, v in gpt.items() if getattr(run.gpt, k.split(".")[1]) != v})
    run.model.update(imported.model)
    run.gpt.rotary_base, run.gpt.share_embeddings = gpt["gpt.rotary_base"], gpt["gpt.share_embeddings"]
    tokenizer = hf_dir / "tokenizer.model"
    output.parent.mkdir(parents=True, exist_ok=True)
    with process_group(), megatron_device():
        # Published atomically: an existing output is replaced only once the new one is complete.
        write_weights_checkpoint(output, state, run, tokenizer if tokenizer.is_file() else None)
    return [f"{key}={value!r}" for key, value in overrides.items()] + [
        f"train.init_from={str(output)!r}", f"train.output_dir={str(_run_folder_for(output))!r}"]


def _is_weights_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a weights-only checkpoint as this tool writes them: exactly the
    files its manifest lists, no optimizer state, and not among a run's checkpoints."""
    from megatron.core import dist_checkpointing

    manifest = folder / "manifest.json"
    try:
        listed = set(json.loads(manifest.read_text()))
        common = dist_checkpointing.load_common_state_dict(str(folder))
    except Exception:  # anything unreadable is not one of ours
        return False
    in_a_run = folder.parent.name == "checkpoints" or (folder.parent / "latest").is_file()
    return ({path.name for path in folder.iterdir()} == listed | {manifest.name}
            and "optimizer_kind" not in common and not in_a_run)


def _run_folder_for(init: Path) -> Path:
    """A folder for the run that starts from ``init``: its parent, unless that holds a run."""
    parent = init.parent
    holds_run = (parent / "checkpoints").exists() or (parent / "metrics.jsonl").exists()
    return parent / f"{init.name}-run" if holds_run else parent


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    from megatron_emo.config import ConfigError
    from megatron_emo.convert.qwen2_moe import ConversionError

    try:
        sets = convert(args)
    except (ConversionError, ConfigError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {args.output}; train from it with:")
    print(f"  python -m megatron_emo.train --recipe {args.recipe} " + " ".join(f'--set "{s}"' for s in sets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
