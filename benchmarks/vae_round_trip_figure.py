"""The subjects through the VAE of each given mini SDXL: what the best sample of that pipeline can look like.

    python benchmarks/vae_round_trip_figure.py OLD_MODEL assets/mini-sdxl docs/vae-round-trip.png

One row per subject (the three reported, then the tuning subjects): true renders on four backgrounds, then the
same renders encoded and decoded by each model's VAE.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from diffusers import StableDiffusionXLPipeline
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_moslora.world.pretrain import vae_round_trip  # noqa: E402
from dreambooth_moslora.world.subjects import SUBJECTS, TUNING_SUBJECTS, render_subject  # noqa: E402

BACKGROUNDS, SCALE = ("green", "red", "orange", "black"), 3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    pipes = [StableDiffusionXLPipeline.from_pretrained(m) for m in args.models]
    rows = []
    for subject in (*SUBJECTS, *TUNING_SUBJECTS):
        rng = np.random.default_rng(3)
        renders = [render_subject(subject, rng, background=b) for b in BACKGROUNDS]
        cells = renders + [image for pipe in pipes for image in vae_round_trip(pipe, renders)]
        rows.append(np.concatenate([np.asarray(c.convert("RGB")) for c in cells], axis=1))
    figure = Image.fromarray(np.concatenate(rows, axis=0))
    figure.resize((figure.width * SCALE, figure.height * SCALE), Image.NEAREST).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
