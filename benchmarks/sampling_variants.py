"""Diagnosis: a trained run's checkpoints measured again under other ways of sampling the same adapter.

Classifier-free guidance is where trained samples on the mini model go wrong (over-contrasted patterns in the
wrong colours), so each variant changes one thing about it: its scale, its rescaling (Lin et al. 2023, diffusers'
guidance_rescale), guidance for the first part of the steps only (the conditional branch alone after that), the
unconditional branch drawn by the base model (adapter off there), or the adapter's scale. Only the sampling
changes; the measures are the benchmark's.

    python benchmarks/sampling_variants.py --subject blue-heart --steps 400 1600 \\
        --run_dir OUT/runs/blue-heart/lora-lr0.001-seed0-prior --output OUT/sampling-variants.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_moslora.adapter.files import write_text_atomically  # noqa: E402
from dreambooth_moslora.adapter.inject import moslora_disabled  # noqa: E402
from dreambooth_moslora.pipeline.generate import GenerationSettings, load_pipeline  # noqa: E402
from dreambooth_moslora.world.analyzer import load_analyzer  # noqa: E402
from dreambooth_moslora.world.personalization import BenchmarkSettings, SubjectBench, measure  # noqa: E402
from dreambooth_moslora.world.subjects import ALL_SUBJECTS, subject_by_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "guidance 5 (the benchmark's)": {},
    "guidance 5, rescaled 0.7": {"guidance_rescale": 0.7},
    "guidance 5, rescaled 1.0": {"guidance_rescale": 1.0},
    "guidance 7.5, rescaled 0.7": {"guidance_scale": 7.5, "guidance_rescale": 0.7},
    "guidance 3, rescaled 0.7": {"guidance_scale": 3.0, "guidance_rescale": 0.7},
    "guidance 5 for the first 75% of steps": {"guided_fraction": 0.75},
    "guidance 5 for the first 50% of steps": {"guided_fraction": 0.5},
    "guidance 5 for the first 30% of steps": {"guided_fraction": 0.3},
    "unconditional branch by the base model": {"base_unconditional": True},
    "adapter scale 0.75": {"adapter_scale": 0.75},
}


class VariantPipeline:
    """The pipeline, called as the benchmark calls it, with one variant's change to guidance."""

    def __init__(self, pipe, guidance_scale=5.0, guidance_rescale=0.0, guided_fraction=1.0, base_unconditional=False):
        self.pipe, self.guidance_scale, self.guidance_rescale = pipe, guidance_scale, guidance_rescale
        self.guided_fraction = guided_fraction
        if base_unconditional:
            self._split_unconditional_branch(pipe.unet)

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, guidance_scale=None, **kwargs):
        kwargs.update(guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale)
        if self.guided_fraction < 1:
            kwargs.update(callback_on_step_end=self._stop_guidance,
                          callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds", "add_time_ids"])
        return self.pipe(*args, **kwargs)

    def _stop_guidance(self, pipe, index, timestep, tensors):
        """After the guided steps, the conditional branch alone (as diffusers' dynamic-CFG callback does)."""
        if index + 1 != round(pipe.num_timesteps * self.guided_fraction):
            return tensors
        pipe._guidance_scale = 1.0
        return {name: tensor.chunk(2)[-1] for name, tensor in tensors.items()}

    @staticmethod
    def _split_unconditional_branch(unet):
        forward = unet.forward

        def split(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs, **kwargs):
            def branch(part):
                return forward(sample[part], timestep, encoder_hidden_states[part], *args,
                               added_cond_kwargs={k: v[part] for k, v in added_cond_kwargs.items()}, **kwargs)[0]

            half = sample.shape[0] // 2
            with moslora_disabled(unet):
                unconditional = branch(slice(0, half))
            return (torch.cat([unconditional, branch(slice(half, None))]),)

        unet.forward = split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", required=True, choices=[s.name for s in ALL_SUBJECTS])
    parser.add_argument("--run_dir", type=Path, required=True, help="a benchmark run: its final adapter and checkpoints")
    parser.add_argument("--steps", nargs="+", type=int, required=True, help="checkpoints to measure; the largest is the final adapter")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--base_model", default=str(ROOT / "assets" / "mini-sdxl"))
    parser.add_argument("--analyzer_file", default=str(ROOT / "assets" / "world-analyzer.safetensors"))
    args = parser.parse_args(argv)
    settings = BenchmarkSettings(base_model=args.base_model, analyzer_file=args.analyzer_file,
                                 output_dir=str(args.output.parent / "sampling-variants-work"), subjects=(args.subject,))
    analyzer = load_analyzer(settings.analyzer_file)
    bench = SubjectBench(subject_by_name(args.subject), settings, analyzer, GenerationSettings())
    rows = []
    for name, variant in VARIANTS.items():
        variant = dict(variant)
        generation = GenerationSettings(adapter_scale=variant.pop("adapter_scale", 1.0))
        for step in [None, *args.steps]:
            final = step == max(args.steps)
            adapter = None if step is None else args.run_dir / ("" if final else f"checkpoint-{step}") / "moslora.safetensors"
            pipe = VariantPipeline(load_pipeline(settings.base_model, adapter, generation, device="cpu"), **variant)
            metrics, _ = measure(pipe, analyzer, bench.subject, bench.real, settings)
            rows.append({"variant": name, "step": step or "untrained", **metrics})
            print(f"{name}, step {step or 'untrained'}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    record = {"subject": args.subject, "run_dir": str(args.run_dir), "real_vs_real": bench.real_vs_real,
              "oracle": bench.oracle, "rows": rows}
    write_text_atomically(args.output, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
