"""DreamBooth-train a MoSLoRA adapter for Stable Diffusion XL: `python train_dreambooth.py --help`.

The same as `dreambooth-moslora train`; it also runs under `accelerate launch` and `torchrun`.
"""

import sys

from dreambooth_moslora.arguments import parse_args
from dreambooth_moslora.cli import run_reporting_errors
from dreambooth_moslora.train import train


def main(args):
    return train(args)


if __name__ == "__main__":
    sys.exit(run_reporting_errors(lambda argv: main(parse_args(argv)), sys.argv[1:]))
