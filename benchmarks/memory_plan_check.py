"""The memory plan against a real GPU: the trainer itself (`train`: its loading, caching, offloading, its own
`micro_step`, checkpoint and final validation) on an SDXL-architecture pipeline with random weights, a few steps
per preset. torch.cuda.max_memory_allocated is read per phase and compared with the plan's figures for the same
options (`plan_settings`, the decisions the trainer itself takes):

- setup: loading, caching and placement, until the first step (plan: `setup()`, the VAE on whole photos);
- step: the trainer's micro_step, forward, backward and optimizer (plan: `total`);
- after: checkpoints, the final validation sampling and the export (plan: `validation()`, whole images).

    python benchmarks/memory_plan_check.py                                  # 1024 px, rank 16, bf16, 3 steps
    python benchmarks/memory_plan_check.py --mixed_precision fp16 --card_gib 8 --presets low_memory

--card_gib caps this process's share of the card (torch.cuda.set_per_process_memory_fraction), so an 8 GiB card's
out-of-memory shows on a larger one. Writes benchmarks/memory-plan-<gpu>-<resolution>px-<precision>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_moslora.trainer import train as train_module  # noqa: E402
from dreambooth_moslora.adapter.errors import UserInputError  # noqa: E402
from dreambooth_moslora.pipeline.sdxl import save_random_sdxl_pipeline  # noqa: E402
from dreambooth_moslora.trainer.arguments import parse_args  # noqa: E402
from dreambooth_moslora.trainer.data import read_examples  # noqa: E402
from dreambooth_moslora.trainer.memory_plan import GIB, PRESET_OPTIONS, model_configs, plan_memory, plan_settings  # noqa: E402


class PhasePeaks:
    """max_memory_allocated per phase: the allocator's peak is read and reset at each phase change."""

    def __init__(self, device):
        self.device, self.phase, self.peaks = device, "setup", {}

    def enter(self, phase: str):
        peak = torch.cuda.max_memory_allocated(self.device)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.phase = phase


def measure(base: Path, photos: Path, options: list[str], device) -> tuple[dict, dict, float]:
    """One short training with the options; returns the phases' peaks, the plan's figures and seconds per step."""
    args = parse_args(training_argv(base, photos, Path(tempfile.mkdtemp(prefix="memory-plan-check-")), options))
    torch.cuda.empty_cache()
    phases = PhasePeaks(device)
    torch.cuda.reset_peak_memory_stats(device)
    micro_step = train_module.TrainingLoop.micro_step

    def measured_step(self, *step_args):
        phases.enter("step")
        try:
            return micro_step(self, *step_args)
        finally:
            phases.enter("after")

    train_module.TrainingLoop.micro_step = measured_step
    try:
        result = train_module.train(args)
    finally:
        train_module.TrainingLoop.micro_step = micro_step
    phases.enter("done")
    return phases.peaks, planned(args, base, photos), result.seconds / max(result.steps, 1)


def training_argv(base, photos: Path, output: Path, options: list[str]) -> list[str]:
    return ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(photos),
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(output), "--report_to", "none",
            "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1",
            "--num_inference_steps", "2", *options]


def planned(args, base, photos: Path) -> dict:
    """The plan's figures for a run's options and photos, phase by phase (setup and after also with VAE tiles,
    which a capped card falls back to)."""
    examples = read_examples(photos, args.instance_prompt, args.resolution, args.bucketing)
    plan = plan_memory(model_configs(str(base)), plan_settings(args, examples, mixed_precision=args.mixed_precision))
    return {"setup": plan.setup(), "step": plan.total, "after": plan.validation(),
            "setup_tiled": plan.setup(tiled=True), "after_tiled": plan.validation(tiled=True)}


def replan(result_file: Path, parser) -> dict:
    """A GPU run's measurements against the plan as it is now, on any machine: the plan's figures recomputed for
    the run's own options and photos (an SDXL folder not here is planned from SDXL's configs, as it has them)."""
    result = json.loads(result_file.read_text())
    run = parser.parse_known_args(shlex.split(result["command"])[2:])[0]  # sys.argv joined: split loosely
    base = run.model if run.model and Path(run.model).is_dir() else "stabilityai/stable-diffusion-xl-base-1.0"
    with tempfile.TemporaryDirectory(prefix="memory-plan-") as work:
        photos = write_photos(Path(work) / "photos", run.resolution)
        for row in result["rows"]:
            if "measured" in row:
                options = common_options(run) + PRESET_OPTIONS[row["preset"]]
                row["predicted"] = planned(parse_args(training_argv(base, photos, Path(work) / "out", options)),
                                           base, photos)
    result["command"] += f"`, plan recomputed on {time.strftime('%Y-%m-%d')}: `python {' '.join(sys.argv)}"
    return result


def common_options(run) -> list[str]:
    return ["--resolution", str(run.resolution), "--rank", str(run.rank), "--max_train_steps", str(run.steps),
            "--checkpointing_steps", str(run.steps), "--mixed_precision", run.mixed_precision, "--center_crop"]


def write_photos(folder: Path, resolution: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(4):
        pixels = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixed_precision", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--presets", default=",".join(PRESET_OPTIONS), help="comma-separated, of: " + ", ".join(PRESET_OPTIONS))
    parser.add_argument("--card_gib", type=float, default=None, help="cap this process's share of the card")
    parser.add_argument("--model", default=None,
                        help="an SDXL-architecture folder (the mini model's too); one not there yet gets SDXL with "
                             "random weights saved into it first (default: a temporary one)")
    parser.add_argument("--replan", type=Path, default=None,
                        help="no GPU: a result .json of this script, its plan figures recomputed by the plan as it "
                             "is now; writes <its name>-replanned.md")
    return parser


def main():
    parser = build_parser()
    args = parser.parse_args()
    if args.replan:
        result = replan(args.replan, parser)
        args.replan.with_name(args.replan.stem + "-replanned.md").write_text(markdown(result))
        print(markdown(result))
        return
    if not torch.cuda.is_available():
        parser.error("this check needs a CUDA GPU; on the CPU, tests/test_memory_plan.py checks the plan")
    device = torch.device("cuda")
    if args.card_gib:
        torch.cuda.set_per_process_memory_fraction(args.card_gib * GIB / torch.cuda.get_device_properties(device).total_memory)
    work = Path(tempfile.mkdtemp(prefix="memory-plan-"))
    base = Path(args.model) if args.model else work / "sdxl"
    if not base.exists():
        save_random_sdxl_pipeline(base)
    photos = write_photos(work / "photos", args.resolution)
    common = common_options(args)
    rows = []
    for name in args.presets.split(","):
        try:
            peaks, predicted, step_s = measure(base, photos, common + PRESET_OPTIONS[name], device)
            row = {"preset": name, "options": PRESET_OPTIONS[name], "measured": peaks, "predicted": predicted,
                   "step_s": step_s}
        except torch.OutOfMemoryError as error:
            row = {"preset": name, "options": PRESET_OPTIONS[name], "out_of_memory": str(error).splitlines()[0]}
        except UserInputError as error:  # 8-bit AdamW without bitsandbytes
            row = {"preset": name, "options": PRESET_OPTIONS[name], "skipped": str(error)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    cap = f"-{args.card_gib:g}gib" if args.card_gib else ""
    stem = ROOT / "benchmarks" / f"memory-plan-{slug}-{args.resolution}px-{args.mixed_precision}{cap}"
    result = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "command": "python " + " ".join(sys.argv), "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"{result['gpu']}, {result['date']}, torch {result['torch']}: `{result['command']}`", "",
             "| preset | setup: plan / measured | step: plan / measured | after: plan* / measured | step |",
             "| --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        if "measured" not in row:
            lines.append(f"| {row['preset']} | {'out of memory' if 'out_of_memory' in row else row['skipped']} | | | |")
            continue
        cells = [f"{_planned_cell(row['predicted'], phase)} / {row['measured'].get(phase, 0) / GIB:.2f} GiB"
                 for phase in ("setup", "step", "after")]
        lines.append(f"| {row['preset']} | {' | '.join(cells)} | {row['step_s']:.2f} s |")
    lines += ["", "*validation and the export; the plan counts validation (sampling and the VAE's decode), whole and "
              "(in brackets) with the VAE in tiles, which a capped card falls back to."]
    return "\n".join(lines) + "\n"


def _planned_cell(predicted: dict, phase: str) -> str:
    tiled = predicted.get(f"{phase}_tiled")
    return f"{predicted[phase] / GIB:.2f}" + (f" ({tiled / GIB:.2f})" if tiled is not None else "")


if __name__ == "__main__":
    main()
