"""The few lines a run ends with: how far it got, its last losses, where its outputs are and
what to run next. Read back from the run folder, so a finished run re-run says the same."""

import json
from pathlib import Path

from megatron_emo.checkpoint.store import find_latest


def _last_record(path: Path):
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    return json.loads(lines[-1]) if lines else None


def run_summary(output_dir: Path, *, steps: int) -> list[str]:
    """The closing lines of the run in ``output_dir`` (planned length ``steps``)."""
    output_dir = Path(output_dir)
    lines = []
    record = _last_record(output_dir / "metrics.jsonl")
    if record is not None:
        lines.append(f"step {record['step']} of {steps}: training loss {record['loss']:.4f}")
    evaluation = _last_record(output_dir / "eval.jsonl")
    if evaluation is not None:
        losses = " | ".join(f"{key[len('eval/'):]} {value:.4f}"
                            for key, value in evaluation.items() if key.startswith("eval/"))
        lines.append(f"validation loss at step {evaluation['step']}: {losses}")
    checkpoint = find_latest(output_dir / "checkpoints")
    outputs = ["metrics.jsonl", "eval.jsonl", "tensorboard"]
    present = [name for name in outputs if (output_dir / name).is_dir() or _last_record(output_dir / name)]
    lines.append(f"outputs in {output_dir}: {', '.join(present)}"
                 + (f"; newest checkpoint {checkpoint}" if checkpoint else "; no checkpoint (train.save=False)"))
    if checkpoint is not None:
        lines.append(f"next: export it to Hugging Face with python tools/convert_to_hf.py --checkpoint {checkpoint} "
                     f"--output {output_dir / 'hf'}")
    if record is not None:
        lines.append(f"      plot its curves with python tools/plot_metrics.py {output_dir}"
                     + (f" (or tensorboard --logdir {output_dir})" if "tensorboard" in present else ""))
    return lines
