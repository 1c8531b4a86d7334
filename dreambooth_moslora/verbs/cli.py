"""The `dreambooth-moslora` command: one verb per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..adapter.errors import UserInputError
from ..adapter.feedback import quiet_dependency_progress_bars
from ..adapter.files import check_writable_file, check_writable_folder
from ..trainer.parser import CommandParser


def _tiny_pipeline(args):
    from ..pipeline.tiny import save_tiny_sdxl_pipeline

    path = save_tiny_sdxl_pipeline(args.output_dir, seed=args.seed)
    print(f"wrote a tiny random-weight SDXL pipeline to {path}")


def _train(argv: list[str]):
    from ..trainer.arguments import parse_args
    from ..trainer.train import train

    train(parse_args(argv, prog="dreambooth-moslora train"))


def _plan(argv: list[str]):
    from ..trainer.arguments import build_parser, validate_args
    from ..trainer.concepts import read_concepts
    from ..trainer.data import read_examples
    from ..trainer.memory_plan import CACHED_IMAGES, model_configs, plan_report, plan_settings, planned_class_examples

    args = validate_args(build_parser("dreambooth-moslora plan").parse_args(argv), needs_data=False)
    if args.dataset:
        instance = read_concepts(args.dataset, args.resolution, args.bucketing).instance_examples
    else:
        instance = (read_examples(args.instance_data_dir, args.instance_prompt or "", args.resolution, args.bucketing)
                    if args.instance_data_dir else None)
    classes = planned_class_examples(args, len(instance) if instance is not None else CACHED_IMAGES)
    configs = model_configs(args.pretrained_model_name_or_path, args.model_config)
    print(plan_report(configs, plan_settings(args, instance, classes)), end="")


def _settings(args):
    from ..pipeline.generate import GenerationSettings
    from ..trainer.arguments import check_at_least_one

    check_at_least_one(args, ("num_images_per_prompt", "batch_size", "num_inference_steps"))
    return GenerationSettings(
        negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images_per_prompt, seed=args.seed,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, height=args.height,
        width=args.width, adapter_scale=args.adapter_scale, fuse=args.fuse, scheduler=args.scheduler,
        batch_size=args.batch_size,
    )


def _generate(args):
    from ..pipeline.generate import generate_images, load_pipeline
    from ..trainer.prompt_words import read_prompts

    prompts = read_prompts(args.prompt, args.prompts_file)
    check_writable_folder(args.output_dir, "--output_dir")
    settings = _settings(args)
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.adapter, settings, args.device, args.dtype,
                         args.model_config)
    paths = generate_images(pipe, prompts, settings, args.output_dir, adapter_name=str(args.adapter or ""))
    print(f"wrote {len(paths)} images and grid.png to {args.output_dir}")


def _evaluate(args):
    from .evaluate import evaluate_adapters, metrics_table, parse_adapter_specs

    check_writable_folder(args.output_dir, "--output_dir")
    results = evaluate_adapters(
        args.pretrained_model_name_or_path, parse_adapter_specs(args.adapter), args.subject_dir, args.token,
        args.class_noun, args.output_dir, args.prompt_list, args.prompts_file, _settings(args),
        args.dino_model, args.clip_model, args.device, args.dtype, args.model_config,
    )
    print(metrics_table(results), end="")
    print(f"wrote {args.output_dir}/metrics.json and metrics.md")


def _inspect(args):
    from .inspection import format_report, inspect_adapter

    report = inspect_adapter(args.file)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def _export(args):
    from ..adapter.io import (DIFFUSERS_FILE, KOHYA_FILE, TRIGGER_FILE, export_diffusers, export_kohya,
                              export_trigger_embedding, read_moslora)

    exporter, default_name = {"kohya": (export_kohya, KOHYA_FILE), "diffusers": (export_diffusers, DIFFUSERS_FILE),
                              "trigger": (export_trigger_embedding, TRIGGER_FILE)}[args.format]
    if args.format == "trigger" and args.rank:
        raise UserInputError("--rank applies to the LoRA formats; a trigger embedding has no rank")
    output = check_writable_file(args.output or Path(args.file).with_name(default_name), "--output")
    path = exporter(args.file, output, **({"rank": args.rank} if args.format != "trigger" else {}))
    message = f"wrote {path}"
    if args.rank:
        error = read_moslora(args.file).compression_error(args.rank)
        message += f"; rank {args.rank} keeps ΔW to a relative error of {error:.4f} (Frobenius, all modules)"
    print(message)


def _ui(args):
    try:
        from ..ui.server import serve
    except ImportError as error:
        raise UserInputError(f"the UI needs its extra ({error.name} is missing): pip install -e \".[ui]\"") from None
    serve(args.jobs_dir, args.host, args.port, args.token)


def _add_sampling_options(parser):
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="hub id or folder of an SDXL pipeline, or one original-layout .safetensors file")
    parser.add_argument("--model_config", default=None,
                        help="for a single-file model: a diffusers SDXL folder whose configs and tokenizers to use")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--num_images_per_prompt", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=1,
                        help="images per pipeline call: faster when memory allows, same images (each has its seed)")
    parser.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j")
    parser.add_argument("--num_inference_steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--height", type=int, default=None, help="default: the model's (1024 for SDXL)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--adapter_scale", type=float, default=1.0)
    parser.add_argument("--fuse", action="store_true", help="merge the adapter into the weights: base-model speed")
    parser.add_argument("--scheduler", default=None, help="euler, euler_a, dpm++_2m, dpm++_2m_karras, "
                        "dpm++_2m_sde_karras, ddim, heun, lms, unipc (default: the model's own)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                        help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--output_dir", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="dreambooth-moslora", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    # `train` has its own parser (arguments.py); main() hands it the rest of the command line.
    verbs.add_parser("train", add_help=False, help="DreamBooth-train a MoSLoRA adapter (train --help)")
    verbs.add_parser("plan", add_help=False,
                     help="will it fit? peak GPU memory of training with train's options, before any download")

    generate = verbs.add_parser("generate", help="make images with a base model and an adapter")
    generate.add_argument("--adapter", default=None, help="an output folder or any of its three adapter files")
    generate.add_argument("--prompt", action="append", default=[], help="repeatable")
    generate.add_argument("--prompts_file", default=None, help="one prompt per line")
    _add_sampling_options(generate)
    generate.set_defaults(run=_generate)

    evaluate = verbs.add_parser("evaluate", help="DreamBooth metrics (DINO, CLIP-I, CLIP-T) of one or more adapters")
    evaluate.add_argument("--adapter", action="append", required=True,
                          help="name=path, repeatable; name=none evaluates the base model alone")
    evaluate.add_argument("--subject_dir", required=True, help="the subject's real photos")
    evaluate.add_argument("--token", default="sks", help="the trigger word (default sks)")
    evaluate.add_argument("--class_noun", required=True, help="e.g. dog")
    evaluate.add_argument("--prompt_list", choices=["object", "live"], default="object",
                          help="the benchmark's 25 object prompts or 25 live-subject prompts")
    evaluate.add_argument("--prompts_file", default=None, help="instead of the benchmark's: prompts with the trigger")
    evaluate.add_argument("--dino_model", default="facebook/dino-vits16")
    evaluate.add_argument("--clip_model", default="openai/clip-vit-base-patch32")
    _add_sampling_options(evaluate)
    evaluate.set_defaults(run=_evaluate)

    inspect = verbs.add_parser("inspect", help="what an adapter file holds, and the spectrum of each update")
    inspect.add_argument("file", help="an adapter file or output folder")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=_inspect)

    export = verbs.add_parser("export", help="native file → diffusers or kohya file, optionally at a lower rank, "
                                             "or its learned trigger embedding")
    export.add_argument("file", help="a native moslora.safetensors")
    export.add_argument("--format", choices=["diffusers", "kohya", "trigger"], required=True,
                        help="trigger: the learned trigger embedding (clip_l/clip_g) for A1111, ComfyUI, diffusers")
    export.add_argument("--output", default=None, help="default: the standard file name beside the input")
    export.add_argument("--rank", type=int, default=None, help="re-compress ΔW by truncated SVD to this rank")
    export.set_defaults(run=_export)

    ui = verbs.add_parser("ui", help="a local web app: the training form, the job queue, progress, samples, "
                                     "downloads and generation (needs the ui extra: pip install -e \".[ui]\")")
    ui.add_argument("--jobs_dir", default="dreambooth-moslora-jobs",
                    help="where each job's folder (photos, output, log) is kept (default ./dreambooth-moslora-jobs)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1, this machine only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--token", default=None, help="the access token (default: the jobs folder's own, generated once, "
                                                  "kept owner-only in its .ui-token and printed in the URL)")
    ui.set_defaults(run=_ui)

    tiny = verbs.add_parser(
        "tiny-pipeline",
        help="write a tiny SDXL-architecture pipeline with random weights (for tests and offline trials)",
    )
    tiny.add_argument("output_dir", help="folder to write the diffusers pipeline into")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.set_defaults(run=_tiny_pipeline)
    return parser


def run_reporting_errors(run, args, loads_models: bool = True) -> int:
    """Bad input becomes one line on stderr and exit code 2, never a traceback; Ctrl-C exits 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if loads_models:  # the file-only verbs skip importing diffusers and transformers: seconds saved
        quiet_dependency_progress_bars()
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
    if argv[:1] == ["plan"]:
        return run_reporting_errors(_plan, argv[1:])
    args = build_parser().parse_args(argv)
    return run_reporting_errors(args.run, args, loads_models=args.run not in (_inspect, _export, _ui))


if __name__ == "__main__":
    sys.exit(main())
