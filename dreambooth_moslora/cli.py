"""The `dreambooth-moslora` command: one verb per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import UserInputError


def _tiny_pipeline(args):
    from .tiny import save_tiny_sdxl_pipeline

    path = save_tiny_sdxl_pipeline(args.output_dir, seed=args.seed)
    print(f"wrote a tiny random-weight SDXL pipeline to {path}")


def _train(argv: list[str]):
    from .arguments import parse_args
    from .train import train

    train(parse_args(argv, prog="dreambooth-moslora train"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreambooth-moslora", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    tiny = verbs.add_parser(
        "tiny-pipeline",
        help="write a tiny SDXL-architecture pipeline with random weights (for tests and offline trials)",
    )
    tiny.add_argument("output_dir", help="folder to write the diffusers pipeline into")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.set_defaults(run=_tiny_pipeline)
    # `train` has its own parser (arguments.py); main() hands it the rest of the command line.
    verbs.add_parser("train", add_help=False, help="DreamBooth-train a MoSLoRA adapter (train --help)")
    return parser


def run_reporting_errors(run, args) -> int:
    """Bad input becomes one line on stderr and exit code 2, never a traceback; Ctrl-C exits 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        run(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"stopped: {interrupt or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return run_reporting_errors(_train, argv[1:])
    args = build_parser().parse_args(argv)
    return run_reporting_errors(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
