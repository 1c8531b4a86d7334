"""The trainer's measured validation: each validation's samples measured against the photos into the run's record
(run_record.py: the history, the chosen step and best/), the report redrawn, and the verdict for early stopping.
The measuring is validation_metrics', the choosing checkpoint_choice's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from PIL import Image

from ..adapter.errors import UserInputError
from .checkpoint_choice import ChoiceRule
from .data import image_files, load_rgb
from .dataset_config import MeasuredSubject
from .prompt_words import prompt_words, trigger_words
from .run_record import VALIDATION_FOLDER, RunRecord
from .validation_metrics import FeatureModels, ValidationPrompt, validation_prompts, write_report

logger = logging.getLogger(__name__)
REPORT_FILE = "report.html"


def load_feature_models(args) -> FeatureModels | None:
    """`auto`: the feature models if they load, else one warning and plain validation; `on`, or an option that
    chooses among measured validations (--keep best, --early_stopping_patience): they must load (one clear error
    before training); `none`, or validation only at the end (nothing to choose among): none."""
    if args.validation_metrics == "none" or not (args.validation_prompt and args.validation_steps):
        if args.validation_metrics == "on":
            raise UserInputError("--validation_metrics on measures the validations during training: it needs "
                                 "--validation_prompt and --validation_steps")
        return None
    try:
        return FeatureModels.load(None if args.validation_metrics_model else args.validation_dino_model,
                                  None if args.validation_metrics_model else args.validation_clip_model,
                                  args.validation_metrics_model)
    except UserInputError as error:
        needing = [option for option, used in (("--keep best", args.keep == "best"),
                                               ("--early_stopping_patience", args.early_stopping_patience))
                   if used]
        if needing:
            raise UserInputError(f"{error}; {' and '.join(needing)} choose among measured validations, which need "
                                 "these models") from None
        if args.validation_metrics == "on":
            raise UserInputError(f"{error}, or --validation_metrics none") from None
        logger.warning("validation is not measured: %s (--validation_metrics none silences this)", error)
        return None


class SubjectUnderTest:
    """One subject's prompts (the user's that name it, its contexts, its class) and reference photos."""

    def __init__(self, subject: MeasuredSubject, user_prompts: list[str], every_trigger: set[str]):
        self.name = subject.name
        self.prompts = validation_prompts(subject.instance_prompt, user_prompts, subject.class_prompt,
                                          trigger_words=every_trigger)  # CLIP-T reads no subject's trigger
        self.photo_paths = image_files(subject.reference_dir)
        self.photos = [load_rgb(p) for p in self.photo_paths]


def subjects_under_test(subjects: list[MeasuredSubject], user_prompt: str) -> list[SubjectUnderTest]:
    """Each subject with the user's validation prompt when the prompt names its trigger (the first subject's
    when it names none)."""
    words = set(prompt_words(user_prompt))
    triggers = [trigger_words(s.instance_prompt, s.class_prompt) for s in subjects]
    named = [s for s, own in zip(subjects, triggers) if own & words] or subjects[:1]
    every_trigger = set().union(*triggers)
    return [SubjectUnderTest(s, [user_prompt] if s in named else [], every_trigger) for s in subjects]


class MeasuredValidation:
    """The subjects and prompts a run measures, the samples on disk, and the run's record of what was measured."""

    def __init__(self, args, feature_models: FeatureModels, resumed_from: Path | None):
        self.args, self.feature_models = args, feature_models
        self.folder = Path(args.output_dir) / VALIDATION_FOLDER
        self.subjects = subjects_under_test(args.dataset.measured_subjects(), args.validation_prompt)
        by_text: dict[str, ValidationPrompt] = {}
        for prompt in (p for subject in self.subjects for p in subject.prompts):
            by_text.setdefault(prompt.prompt, prompt)  # a prompt two subjects share is sampled once
        self.prompts = list(by_text.values())
        self.instance_paths = [p for subject in self.subjects for p in subject.photo_paths]
        rule = ChoiceRule(args.validation_prompt_tolerance, args.validation_class_tolerance)
        self.run = RunRecord.begin(args.output_dir, rule, resumed_from)
        self.samples = {r["step"]: self._samples_on_disk(r["step"]) for r in self.run.history}  # a resumed run's too

    def _samples_on_disk(self, step: int) -> dict[str, list[Path]]:
        """A step's samples as validate wrote them (a run's last step in final-step-N)."""
        folder = next((f for f in (self.folder / f"step-{step}", self.folder / f"final-step-{step}") if f.is_dir()),
                      self.folder / f"step-{step}")
        paths = sorted(p for p in folder.glob("*.png") if p.name != "grid.png")
        return grouped_by_prompt(paths, self.prompts, self.args.num_validation_images)

    def sampled_paths(self, step: int) -> list[Path] | None:
        """A step measured already (the final validation after an early stop): its samples, not sampled again."""
        if not self.run.measured(step):
            return None
        return [path for paths in self.samples[step].values() for path in paths]

    def record(self, step: int, samples: dict[str, list[Path]],
               write_adapter: Callable[[Path], list[Path]]) -> dict | None:
        """Measure step's samples into the run's record (which writes best/ when the choice moves to this step), and
        redraw the report. A step measured already is not measured again."""
        if self.run.measured(step):
            return None
        images = {prompt: [Image.open(p).convert("RGB") for p in paths] for prompt, paths in samples.items()}
        record = self.run.record(step, self._measure(images), write_adapter)
        self.samples[step] = samples
        write_report(self.folder / REPORT_FILE, self.run.history, self.instance_paths, self.samples, self.prompts,
                     self.run.chosen)
        return record

    def _measure(self, images: dict[str, list[Image.Image]]) -> dict:
        """One subject's measures; for several, their means and each subject's own under "subjects"."""
        own = {s.name: self.feature_models.measure(images, s.prompts, s.photos) for s in self.subjects}
        if len(own) == 1:
            return next(iter(own.values()))
        names = list(dict.fromkeys(k for measures in own.values() for k in measures))
        means = {k: sum(m[k] for m in own.values() if k in m) / sum(k in m for m in own.values()) for k in names}
        return {**means, "subjects": own}

    def should_stop(self) -> bool:
        return self.run.should_stop(self.args.early_stopping_patience)


def grouped_by_prompt(paths: list[Path], prompts: list[ValidationPrompt], per_prompt: int) -> dict[str, list[Path]]:
    """generate_images' paths (prompt i's images together, in order) by prompt."""
    return {p.prompt: paths[i * per_prompt:(i + 1) * per_prompt] for i, p in enumerate(prompts)}

