"""DreamBooth-train a MoSLoRA adapter for Stable Diffusion XL: `python train_dreambooth.py --help`.

The same as `dreambooth-moslora train`; it also runs under `accelerate launch` and `torchrun`.
"""

import sys

from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.train import train
from dreambooth_moslora.verbs.cli import run_reporting_errors


def main(args):
    return train(args)


if __name__ == "__main__":
    sys.exit(run_reporting_errors(lambda argv: main(parse_args(argv)), sys.argv[1:]))
