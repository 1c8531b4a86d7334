"""Options of diffusers' train_dreambooth_lora_sdxl.py that have no same-named option here.

A command copied from diffusers' README either runs or says in one line what to change: the harmless options are
accepted (mapped, or ignored with a warning saying what happens instead), the others refused naming what to use.
They are hidden from --help and documented in docs/training.md.
"""

from __future__ import annotations

import argparse
import logging

from ..adapter.errors import UserInputError

logger = logging.getLogger(__name__)

UPLOAD = ("this trainer uploads nothing: upload the output folder yourself, e.g. "
          "hf upload USER/NAME OUTPUT_DIR (huggingface-cli upload before huggingface_hub 1.0)")
DATASET = ("a Hugging Face dataset is not read: save its images into a folder, each caption in a same-named .txt, "
           "and pass --instance_data_dir")
CROP = "each image's crop top-left is given from its own crop here (aspect-ratio buckets); remove the option"

# option: (takes a value, what happens instead)
IGNORED = {
    "--validation_epochs": (True, "validation runs at the end, and every N optimizer steps with --validation_steps N"),
    "--prior_generation_precision": (True, "class images are generated in the training precision (--mixed_precision)"),
    "--output_kohya_format": (False, "lora_kohya.safetensors is always written"),
    "--local_rank": (True, "accelerate reads each process's rank from LOCAL_RANK"),
}
REFUSED = {
    "--push_to_hub": (False, UPLOAD),
    "--hub_model_id": (True, UPLOAD),
    "--hub_token": (True, UPLOAD),
    "--dataset_name": (True, DATASET),
    "--dataset_config_name": (True, DATASET),
    "--image_column": (True, DATASET),
    "--caption_column": (True, DATASET),
    "--crops_coords_top_left_h": (True, CROP),
    "--crops_coords_top_left_w": (True, CROP),
}
USE_8BIT_ADAM = "--use_8bit_adam"


def add_diffusers_options(parser: argparse.ArgumentParser):
    """Each option is absent from the parsed arguments unless given (default SUPPRESS)."""
    hidden = dict(default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for option, (takes_value, _) in {**IGNORED, **REFUSED, USE_8BIT_ADAM: (False, None)}.items():
        parser.add_argument(option, **hidden, **({} if takes_value else {"action": "store_true"}))


def apply_diffusers_options(args: argparse.Namespace):
    """Refuse, map or drop the diffusers options given, leaving none of them in `args`."""
    given = {option: vars(args).pop(option.lstrip("-")) for option in [*IGNORED, *REFUSED, USE_8BIT_ADAM]
             if option.lstrip("-") in vars(args)}
    for option in given:
        if option in REFUSED:
            raise UserInputError(f"{option} is diffusers' option with no counterpart here: {REFUSED[option][1]}")
    for option in given:
        if option in IGNORED:
            logger.warning("%s (diffusers' option) is ignored: %s", option, IGNORED[option][1])
    if USE_8BIT_ADAM in given:
        if args.optimizer == "adamw":
            args.optimizer = "adamw8bit"
        elif args.optimizer != "adamw8bit":
            logger.warning("%s is ignored with --optimizer %s, as diffusers ignores it", USE_8BIT_ADAM, args.optimizer)
