"""Diagnosis for the personalization benchmark: fine-tune the mini UNet's own weights (no adapter) on a subject.

Does the adapter limit what is learned, or the model? This trains every UNet weight, or only the transformer
blocks' or only the ResNet blocks', on the subject's captioned photos (text encoders frozen, no prior
preservation, ε-prediction as the trainer), and measures checkpoints exactly as the benchmark does. Compare with
`personalization.py --prior off --no_text_encoder` on the same subject.

    python benchmarks/full_finetune.py --subject checked-kite --learning_rate 1e-4 --steps 200 400 800 1600
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402

from dreambooth_moslora.pipeline.generate import GenerationSettings, load_pipeline  # noqa: E402
from dreambooth_moslora.trainer.conditioning import micro_conditioning  # noqa: E402
from dreambooth_moslora.trainer.data import load_rgb, read_examples  # noqa: E402
from dreambooth_moslora.world.analyzer import load_analyzer  # noqa: E402
from dreambooth_moslora.world.personalization import BenchmarkSettings, SubjectBench  # noqa: E402
from dreambooth_moslora.world.render import IMAGE_SIZE, to_pixels  # noqa: E402
from dreambooth_moslora.world.subjects import SUBJECTS, TUNING_SUBJECT, TUNING_SUBJECTS, subject_by_name  # noqa: E402

PARTS = {"all": lambda name: True, "transformer_blocks": lambda name: ".attentions." in name,
         "resnets": lambda name: ".resnets." in name}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", default=TUNING_SUBJECT.name, choices=[s.name for s in (*SUBJECTS, *TUNING_SUBJECTS)])
    parser.add_argument("--part", default="all", choices=list(PARTS))
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--steps", nargs="+", type=int, default=[200, 400, 800, 1600], help="measured at each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "personalization" / "diagnosis" / "full-finetune"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir) / f"{args.subject}-{args.part}-lr{args.learning_rate:g}"
    settings = BenchmarkSettings(base_model=str(ROOT / "assets" / "mini-sdxl"),
                                 analyzer_file=str(ROOT / "assets" / "world-analyzer.safetensors"), output_dir=str(output_dir))
    analyzer = load_analyzer(settings.analyzer_file)
    bench = SubjectBench(subject_by_name(args.subject), settings, analyzer, GenerationSettings())
    pipe = load_pipeline(settings.base_model, None, GenerationSettings(), device="cpu")
    examples = read_examples(bench.instance_dir, bench.subject.instance_prompt(settings.token), IMAGE_SIZE, bucketing=False)
    captions = [e.caption for e in examples]
    pixels = to_pixels([load_rgb(e.path) for e in examples])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    unet, noise_scheduler = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    trained = [p for name, p in unet.named_parameters() if PARTS[args.part](name)]
    unet.requires_grad_(True)  # every weight carries a gradient: with only the ResNets' doing so, torch 2.13 segfaults
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=0.0)
    time_ids = torch.tensor([micro_conditioning((IMAGE_SIZE, IMAGE_SIZE), (0, 0), (IMAGE_SIZE, IMAGE_SIZE))], dtype=torch.float32)
    points = []
    for step in range(1, max(args.steps) + 1):
        unet.train()
        i = torch.randint(0, len(examples), (1,))
        noise, timestep = torch.randn_like(latents[i]), torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,))
        prediction = unet(noise_scheduler.add_noise(latents[i], noise, timestep), timestep, prompt_embeds[i],
                          added_cond_kwargs={"text_embeds": pooled[i], "time_ids": time_ids}).sample
        F.mse_loss(prediction, noise).backward()
        optimizer.step()
        unet.zero_grad(set_to_none=True)
        if step in args.steps:
            unet.eval()
            with torch.no_grad():
                points.append({"step": step, **bench.measure_pipeline(pipe)[0]})
            print(json.dumps(points[-1]), flush=True)
    record = {"subject": args.subject, "part": args.part, "learning_rate": args.learning_rate, "seed": args.seed,
              "trained_parameters": sum(p.numel() for p in trained), "subject_record": bench.record(), "curve": points}
    (output_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
