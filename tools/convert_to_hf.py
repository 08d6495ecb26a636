"""Export a megatron_emo checkpoint as a Hugging Face folder that stock transformers loads.

    python tools/convert_to_hf.py --checkpoint runs/tiny/checkpoints --output runs/tiny/hf
    python tools/convert_to_hf.py --checkpoint runs/tiny/checkpoints/step_00000200 --output runs/tiny/hf \\
        --generate "def main(" --max-new-tokens 8
    python tools/convert_to_hf.py --output runs/tiny/hf --generate "The cat"   # generate only

The folder holds a ``Qwen2MoeForCausalLM`` (``model_type: qwen2_moe``, no remote code):
``config.json``, ``generation_config.json``, safetensors (sharded with an index above
``--max-shard-size``) and the tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
``tokenizer.model``). ``--checkpoint`` takes a ``step_N`` folder, a run's ``checkpoints`` folder
or the run's output folder (then the newest checkpoint). The checkpoint is verified against its
manifest first. The tokenizer is the run's (``data.tokenizer_model``, or the demo corpus's under
``data.cache_dir``) unless ``--tokenizer-model`` names another.

The export is written to a temporary folder beside ``--output`` and renamed when complete; an
earlier export there is deleted only once the new one is in place (a failed export leaves it as
it was). ``--output`` must not be the checkpoint, hold it (the run or its ``checkpoints`` folder)
or lie inside it. An existing non-empty ``--output`` is replaced only with ``--force``, and only
if it is an earlier export: its ``config.json`` carries our ``emo_metadata`` and every entry in
it is a file named as an export names its files (:data:`EXPORT_FILE`). A folder holding anything else (a user's file, a
subfolder) is never replaced.

The HF model routes every token over all routed experts (no document pool, as EMO's own HF
release) and attends causally across EOS: megatron_emo in eval mode with
``emo_eval_pool=None`` on one document gives the same logits. Mapping details:
megatron_emo/convert/qwen2_moe.py.

Exit codes: 0 done; 2 bad input (missing or corrupt checkpoint, no tokenizer, a model the
format cannot express, an --output that is, holds or lies inside the checkpoint, a non-empty one
without --force, or one --force may not replace).
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()  # before megatron-core is imported

import torch  # noqa: E402

EXIT_BAD_INPUT = 2
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_CHECK_DOCS = 30
"""Documents per demo domain re-encoded to check the exported tokenizer."""
EXPORT_FILE = re.compile(
    r"config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer\.json|tokenizer_config\.json|tokenizer\.model"
)
"""The names of the files an export writes (both layouts): ``--force`` replaces a folder only
if it holds nothing but files with these names and its config.json has our ``emo_metadata``."""


class OutputError(Exception):
    """An ``--output`` this tool may not write or replace."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="step_N folder, a run's checkpoints folder, or the run folder")
    parser.add_argument("--output", required=True, help="the Hugging Face folder to write (or read, for --generate)")
    parser.add_argument("--tokenizer-model", help="SentencePiece .model to export instead of the run's")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="dtype of the exported weights (auto: the checkpoint's parameter dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 500MB, 5GB)")
    parser.add_argument("--layout", choices=("qwen2_moe", "emo"), default="qwen2_moe",
                        help="qwen2_moe: stock transformers (default); emo: allenai's EmoForCausalLM key names "
                        "(needs that model's remote code to load)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier export at --output (never a folder holding other files)")
    parser.add_argument("--generate", metavar="PROMPT", help="then load --output in stock transformers and "
                        "print a greedy continuation of PROMPT")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.generate is None:
        parser.error("give --checkpoint (export) and/or --generate (load --output and generate)")
    return args


def _demo_texts(run) -> list[str]:
    """A sample of the run's demo documents, to check the tokenizer on real text."""
    if run.data.blend:
        return []
    texts = []
    for path in sorted((Path(run.data.cache_dir) / "demo" / "text").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for _, line in zip(range(TOKENIZER_CHECK_DOCS), f):
                texts.append(json.loads(line)["text"])
    return texts


def check_output(output: Path, checkpoint: Path, *, force: bool) -> None:
    """Refuse an ``--output`` that is, holds or lies inside ``checkpoint``, a non-empty one
    without ``force``, and one that is not an earlier export (see the module docstring)."""
    out, ckpt = output.resolve(), checkpoint.resolve()
    home = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent  # the run, for a step_N
    if out == ckpt or out in ckpt.parents:
        raise OutputError(f"refusing --output {output}: it is or holds the checkpoint {checkpoint} (the export would "
                          f"replace it); write the export to a folder of its own, e.g. {home / 'hf'}")
    if ckpt in out.parents:
        raise OutputError(f"refusing --output {output}: it is inside the checkpoint {checkpoint}; write the "
                          f"export to a folder of its own, e.g. {home / 'hf'}")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise OutputError(f"refusing --output {output}: it is a file or a symbolic link, not a folder; "
                          "choose another --output")
    entries = sorted(output.iterdir()) if output.exists() else []
    if not entries:
        return
    if not force:
        raise OutputError(f"{output} exists and is not empty: pass --force to replace the earlier export "
                          "there, or choose another --output")
    others = [entry.name for entry in entries
              if entry.is_symlink() or not entry.is_file() or not EXPORT_FILE.fullmatch(entry.name)]
    if others:
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        raise OutputError(f"refusing to replace {output}: it holds {', '.join(others[:5])}{more}, which an export "
                          "does not write (--force replaces only an earlier export); move them away or choose "
                          "another --output")
    if "emo_metadata" not in _json_or_empty(output / "config.json"):
        raise OutputError(f"refusing to replace {output}: its config.json is missing or has no emo_metadata, so it "
                          "is not an earlier export of this tool (--force replaces only those); choose another "
                          "--output")


def _json_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def export(args) -> Path:
    from megatron_emo.convert import hf_folder, qwen2_moe
    from megatron_emo.convert.emo_layout import rewrite_folder_as_emo
    from megatron_emo.convert.hf_tokenizer import export_tokenizer
    from megatron_emo.convert.megatron_checkpoint import find_tokenizer, load_checkpoint_for_export, resolve_checkpoint
    from megatron_emo.data.tokenizer import Tokenizer
    from megatron_emo.files import replace_folder

    output = Path(args.output)
    start = time.time()
    path = resolve_checkpoint(args.checkpoint)
    check_output(output, path, force=args.force)
    checkpoint = load_checkpoint_for_export(path)
    tokenizer = Tokenizer(find_tokenizer(checkpoint.run, checkpoint.path, args.tokenizer_model))
    vocab = checkpoint.vocab_size()
    if tokenizer.vocab_size > vocab:
        raise qwen2_moe.ConversionError(
            f"tokenizer {tokenizer.model_file} has {tokenizer.vocab_size} pieces but the model only "
            f"{vocab} embedding rows: it is not the tokenizer this model was trained with"
        )
    config = checkpoint.emo_config(eos_token_id=tokenizer.eos_id)
    gpt = checkpoint.gpt_settings()

    tmp = output.with_name(f".tmp-{output.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        info = export_tokenizer(tokenizer.model_file, tmp, check_texts=_demo_texts(checkpoint.run))
        hf_folder.save_hf_model(
            tmp, checkpoint.state_dict, config, gpt,
            dtype=DTYPES[args.dtype],
            bos_token_id=info["bos_token_id"],
            pad_token_id=info["pad_token_id"],
            tokenizer_vocab_size=info["vocab_size"],
            max_shard_size=args.max_shard_size,
        )
        if args.layout == "emo":
            rewrite_folder_as_emo(tmp, num_shared=config.emo_num_shared_experts, max_shard_size=args.max_shard_size)
        replace_folder(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    files = sorted(p.name for p in output.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in output.glob("*.safetensors"))
    print(f"exported {checkpoint.path} (step {checkpoint.step}, run {checkpoint.run.name!r}) to {output} "
          f"in {time.time() - start:.1f} s")
    architecture = "EmoForCausalLM layout" if args.layout == "emo" else "Qwen2MoeForCausalLM"
    print(f"  {architecture}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_routed_experts} routed + {config.emo_num_shared_experts} shared experts, "
          f"top-{config.routed_topk} routed + {config.emo_num_shared_experts} shared "
          f"(top-{config.moe_router_topk} with the shared expert), vocab {vocab} (tokenizer {tokenizer.vocab_size}), "
          f"{len(files)} safetensors file(s), {size / 1e6:.1f} MB")
    print(f"  tokenizer: {tokenizer.model_file} -> tokenizer.json, checked identical on {info['checked_texts']} texts")
    if config.emo_router_mode == "emo":
        pool = config.emo_eval_pool
        print(f"  note: the HF model routes every token over all {config.num_routed_experts} routed experts; "
              f"megatron_emo's document pools (eval pool {pool}) have no HF equivalent (recorded in "
              "config.json emo_metadata)")
    return output


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    from megatron_emo.checkpoint.store import CheckpointError
    from megatron_emo.config import ConfigError
    from megatron_emo.convert.hf_tokenizer import TokenizerExportError
    from megatron_emo.convert.qwen2_moe import ConversionError

    try:
        if args.checkpoint is not None:
            export(args)
        if args.generate is not None:
            from megatron_emo.convert.hf_generate import generate

            result = generate(args.output, args.generate, max_new_tokens=args.max_new_tokens)
            print(f"prompt: {args.generate!r} ({len(result.prompt_ids)} tokens)")
            print(f"greedy continuation ({len(result.new_ids)} tokens, stock transformers): {result.text!r}")
            print(f"  token ids: {result.new_ids}")
    except (CheckpointError, ConversionError, TokenizerExportError, ConfigError, FileNotFoundError,
            OutputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
