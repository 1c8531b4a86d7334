"""The dataset file (`--dataset_config`): several subjects, class sets and repeats in one run, as kohya's dataset
TOML, OneTrainer's concepts and SimpleTuner's data backends describe them.

A file is a list of `[[concept]]` tables, each with a role: `instance` (a subject: photos, a prompt with its own
trigger, captions, repeats, a loss weight, masks, and the prior that keeps its class), `class` (regularisation
images shared by the subjects without a prior of their own, kohya's `is_reg`) or `validation` (photos held out of
training that measured validation compares samples with). The single-folder flags mean a one-concept file
(`from_args`), which `dataset_toml` writes out. Every mistake is found here, before any model loads, as one line
naming the concept and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..adapter.errors import UserInputError
from .prompt_words import trigger_words

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, before it joined the standard library
    import tomli as tomllib

ROLES = ("instance", "class", "validation")
PRIORS = ("none", "class_images", "base_model")
COMMON_KEYS = ("name", "role", "image_dir")
KEYS = {
    "instance": COMMON_KEYS + ("instance_prompt", "caption_extension", "repeats", "loss_weight", "mask_dir",
                               "alpha_mask", "prior", "class_prompt", "class_prompts", "class_data_dir",
                               "num_class_images", "prior_loss_weight"),
    "class": COMMON_KEYS + ("class_prompt", "caption_extension", "repeats", "loss_weight"),
    "validation": COMMON_KEYS + ("validates",),
}
REQUIRED = {"instance": ("image_dir", "instance_prompt"), "class": ("image_dir", "class_prompt"),
            "validation": ("image_dir",)}
PATH_KEYS = ("image_dir", "mask_dir", "class_data_dir")
PRIOR_KEYS = ("class_prompt", "class_prompts", "class_data_dir", "num_class_images", "prior_loss_weight")
PRIOR_USES = {"none": (), "base_model": ("class_prompt", "class_prompts", "prior_loss_weight"),
              "class_images": PRIOR_KEYS}
"""The prior keys each prior reads: one given for a prior that ignores it is refused (a forgotten `prior = ...`
would otherwise train without prior preservation, silently); class_prompt also names the class of the trigger."""
NO_CAPTIONS = "none"
DATA_FLAGS = ("instance_data_dir", "instance_prompt", "repeats", "mask_dir", "alpha_mask", "with_prior_preservation",
              "prior_preservation_mode", "class_data_dir", "class_prompts_file", "class_prompt", "num_class_images",
              "prior_loss_weight")
"""The flags a dataset file replaces: beside one they are refused, so the file alone says what trains."""


@dataclass(frozen=True)
class Concept:
    name: str
    image_dir: Path
    role: str = "instance"
    instance_prompt: str | None = None
    """The trigger and the class, e.g. "a photo of sks dog": the caption of a photo without a caption file."""
    caption_extension: str = ".txt"
    """The caption file beside each photo (photo.txt); "none" reads no captions."""
    repeats: int = 1
    loss_weight: float = 1.0
    mask_dir: Path | None = None
    alpha_mask: bool = False
    prior: str = "none"
    """How this subject keeps its class: none, class_images (class_data_dir) or base_model (the frozen model's own
    prediction for the class prompt on the subject's photos)."""
    class_prompt: str | None = None
    class_prompts: tuple[str, ...] = ()
    class_data_dir: Path | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    validates: str | None = None
    """A validation concept: the name of the instance concept whose held-out photos these are."""


@dataclass(frozen=True)
class MeasuredSubject:
    """What measured validation compares samples with: the subject's prompt, its reference photos, its class."""

    name: str
    instance_prompt: str
    reference_dir: Path
    class_prompt: str | None


@dataclass(frozen=True)
class DatasetConfig:
    concepts: tuple[Concept, ...]
    source: str | None = field(default=None, compare=False)
    """"--dataset_config FILE", which errors found later name; None for the single-folder flags."""

    def where(self, concept: Concept) -> str:
        """How an error names a concept: by the file and its name (the flags' folder names itself)."""
        return f"{self.source}: concept {concept.name!r}: " if self.source else ""

    def of_role(self, role: str) -> list[Concept]:
        return [c for c in self.concepts if c.role == role]

    @property
    def instance_prompts(self) -> list[str]:
        return [c.instance_prompt for c in self.of_role("instance")]

    @property
    def base_model_prior(self) -> bool:
        return self.uses_prior("base_model")

    def uses_prior(self, prior: str) -> bool:
        """Whether any subject keeps its class this way."""
        return any(c.prior == prior for c in self.of_role("instance"))

    def measured_subjects(self) -> list[MeasuredSubject]:
        """Every subject, each measured against its held-out photos when a validation concept has them, else
        against its training photos (as with the single-folder flags)."""
        shared = self.of_role("class")
        measured = []
        for subject in self.of_role("instance"):
            held_out = [c for c in self.of_role("validation") if c.validates == subject.name]
            class_prompt = (subject.class_prompt if subject.prior != "none"
                            else shared[0].class_prompt if shared else None)
            measured.append(MeasuredSubject(subject.name, subject.instance_prompt,
                                            held_out[0].image_dir if held_out else subject.image_dir, class_prompt))
        return measured


def load_dataset_config(path) -> DatasetConfig:
    """The file read and checked: paths are relative to the file's folder."""
    path = Path(path)
    source = f"--dataset_config {path}"
    if not path.is_file():
        raise UserInputError(f"{source}: no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{source}: not a TOML file: {error}") from None
    return parse_dataset(data, path.parent, source)


def parse_dataset(data: dict, base: Path, source: str) -> DatasetConfig:
    for key in data:
        if key != "concept":
            raise UserInputError(f"{source}: unknown table {key!r}{_did_you_mean(key, ('concept',))}; the file is "
                                 "a list of [[concept]] tables")
    tables = data.get("concept")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UserInputError(f"{source}: no [[concept]] tables")
    concepts = tuple(_concept(table, index, base, source) for index, table in enumerate(tables))
    return check_dataset(DatasetConfig(concepts), source)


def _concept(table: dict, index: int, base: Path, source: str) -> Concept:
    name = table.get("name", table.get("image_dir"))  # the folder as written: photos/dog and held-out/dog differ
    where = f"{source}: concept {name or f'#{index + 1}'!r}"
    role = table.get("role", "instance")
    if role not in ROLES:
        raise UserInputError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    for key in table:
        if key not in KEYS[role]:
            other = next((r for r in ROLES if key in KEYS[r]), None)
            hint = f" (a key of {other} concepts)" if other else _did_you_mean(key, KEYS[role])
            raise UserInputError(f"{where}: unknown key {key!r}{hint}")
    for key in REQUIRED[role]:
        if key not in table:
            raise UserInputError(f"{where}: {key} is missing")
    values = {key: _typed(table[key], key, where, base) for key in table}
    prior = values.get("prior", "none")
    for key in PRIOR_KEYS:
        if key in table and key != "class_prompt" and prior in PRIOR_USES and key not in PRIOR_USES[prior]:
            using = " or ".join(f'"{p}"' for p in PRIORS if key in PRIOR_USES[p])
            raise UserInputError(f"{where}: {key} is unused with prior {prior!r}; set prior = {using}, or remove it")
    values.setdefault("name", table["image_dir"])
    if "class_prompts" in values:
        values["class_prompts"] = tuple(values["class_prompts"])
        values.setdefault("class_prompt", values["class_prompts"][0] if values["class_prompts"] else None)
    return Concept(**values)


FIELD_TYPES = {field.name: field.type for field in dataclasses.fields(Concept)}


def _typed(value, key: str, where: str, base: Path):
    """The value as its field's type (an integer is a float too, a path is relative to the file)."""
    kind = FIELD_TYPES[key]
    if "tuple" in kind:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        wanted = "a list of strings"
    elif "bool" in kind:
        ok, wanted = isinstance(value, bool), "true or false"
    elif "int" in kind:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif "float" in kind:
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, wanted = isinstance(value, str), "a string"
    if not ok:
        raise UserInputError(f"{where}: {key} must be {wanted}, got {value!r}")
    if key in PATH_KEYS:
        return base / Path(value).expanduser()
    return float(value) if "float" in kind else value


def check_dataset(dataset: DatasetConfig, source: str) -> DatasetConfig:
    """What cannot train: each concept alone, then the concepts together (names, triggers, what a validation
    concept validates)."""
    for concept in dataset.concepts:
        _check_concept(concept, f"{source}: concept {concept.name!r}")
    names = [c.name for c in dataset.concepts]
    for name in names:
        if names.count(name) > 1:
            raise UserInputError(f"{source}: concept {name!r}: name used by {names.count(name)} concepts; give each "
                                 "its own (name = \"...\")")
    subjects = dataset.of_role("instance")
    if not subjects:
        raise UserInputError(f"{source}: no instance concept (role = \"instance\"): nothing to train")
    owner = {}
    for concept in subjects:
        for word in sorted(trigger_words(concept.instance_prompt, concept.class_prompt)):
            if word in owner:
                raise UserInputError(f"{source}: concept {concept.name!r}: instance_prompt's trigger {word!r} is "
                                     f"used by concept {owner[word]!r} too; give each subject its own trigger")
            owner[word] = concept.name
    _check_shared_class_folders(subjects, source)
    if dataset.of_role("class") and all(c.prior != "none" for c in subjects):
        raise UserInputError(f"{source}: concept {dataset.of_role('class')[0].name!r}: no subject uses these class "
                             "images: every instance concept has a prior of its own (prior = \"none\" shares them)")
    for concept in dataset.of_role("validation"):
        if concept.validates is None and len(subjects) > 1:
            raise UserInputError(f"{source}: concept {concept.name!r}: validates is missing: which of "
                                 f"{', '.join(c.name for c in subjects)} are these photos of?")
        if concept.validates is not None and concept.validates not in {c.name for c in subjects}:
            raise UserInputError(f"{source}: concept {concept.name!r}: validates {concept.validates!r} is not an "
                                 f"instance concept{_did_you_mean(concept.validates, [c.name for c in subjects])}")
    return DatasetConfig(tuple(dataclasses.replace(c, validates=c.validates or subjects[0].name)
                               if c.role == "validation" else c for c in dataset.concepts), source)


def _check_shared_class_folders(subjects: list[Concept], source: str):
    """A class folder holds one class's images, their captions the prompt they were made from: two subjects with
    other class prompts in one folder would train the second on the first one's class."""
    owner = {}
    for concept in (c for c in subjects if c.prior == "class_images"):
        folder = concept.class_data_dir.resolve()
        first = owner.setdefault(folder, concept)
        if (first.class_prompt, first.class_prompts) != (concept.class_prompt, concept.class_prompts):
            raise UserInputError(f"{source}: concepts {first.name!r} and {concept.name!r} share class_data_dir "
                                 f"{concept.class_data_dir} with other class prompts; give each its own folder")


def _check_concept(concept: Concept, where: str):
    if not concept.image_dir.is_dir():
        raise UserInputError(f"{where}: image_dir {concept.image_dir} is not a folder")
    if concept.mask_dir is not None and not concept.mask_dir.is_dir():
        raise UserInputError(f"{where}: mask_dir {concept.mask_dir} is not a folder")
    if concept.repeats < 1:
        raise UserInputError(f"{where}: repeats must be at least 1, got {concept.repeats}")
    for key in ("loss_weight", "prior_loss_weight", "num_class_images"):
        if not math.isfinite(getattr(concept, key)) or getattr(concept, key) < 0:  # TOML has nan and inf
            raise UserInputError(f"{where}: {key} must be a finite number, not negative, got {getattr(concept, key)}")
    for key, prompt in [("instance_prompt", concept.instance_prompt), ("class_prompt", concept.class_prompt),
                        *(("class_prompts", p) for p in concept.class_prompts)]:
        if prompt is not None and not prompt.strip():
            raise UserInputError(f"{where}: {key} is empty")
    if concept.caption_extension != NO_CAPTIONS and not concept.caption_extension.startswith("."):
        raise UserInputError(f"{where}: caption_extension must start with a dot (\".txt\") or be \"none\", "
                             f"got {concept.caption_extension!r}")
    if concept.mask_dir is not None and concept.alpha_mask:
        raise UserInputError(f"{where}: mask_dir and alpha_mask both give masks; keep one")
    if concept.prior not in PRIORS:
        raise UserInputError(f"{where}: prior {concept.prior!r} is not one of {', '.join(PRIORS)}")
    if concept.prior != "none" and not (concept.class_prompt or concept.class_prompts):
        raise UserInputError(f"{where}: prior {concept.prior!r} needs class_prompt (e.g. \"a photo of a dog\")")
    if concept.prior == "class_images" and concept.class_data_dir is None:
        raise UserInputError(f"{where}: prior \"class_images\" needs class_data_dir (missing images are generated "
                             "there), or prior = \"base_model\", which needs none")


def _did_you_mean(word: str, known) -> str:
    closest = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {closest[0]!r}?" if closest else ""


def refuse_data_flags(args: argparse.Namespace, defaults: dict):
    """Beside a dataset file, a data flag given on the command line is an error, not silently ignored."""
    given = [name for name in DATA_FLAGS if getattr(args, name) != defaults[name]]
    if given:
        raise UserInputError(f"--dataset_config describes the data; put --{given[0]} into its concepts instead")


def from_args(args: argparse.Namespace) -> DatasetConfig:
    """The one-concept file that the single-folder flags mean (its folders are checked when read, as before)."""
    concept = Concept(
        name=Path(args.instance_data_dir).name or "subject", image_dir=Path(args.instance_data_dir),
        instance_prompt=args.instance_prompt, repeats=args.repeats,
        mask_dir=Path(args.mask_dir) if args.mask_dir else None, alpha_mask=args.alpha_mask)
    if not args.with_prior_preservation:
        return DatasetConfig((concept,))
    mode = args.prior_preservation_mode
    return DatasetConfig((dataclasses.replace(
        concept, prior=mode, class_prompt=args.class_prompt, class_prompts=tuple(args.class_prompts or ()),
        class_data_dir=Path(args.class_data_dir) if mode == "class_images" else None,
        num_class_images=args.num_class_images, prior_loss_weight=args.prior_loss_weight),))


def dataset_toml(dataset: DatasetConfig) -> str:
    """The file for these concepts, every key written out, paths absolute: a start for a file of your own."""
    blocks = []
    for concept in dataset.concepts:
        lines = ["[[concept]]"]
        for key in KEYS[concept.role]:
            value = getattr(concept, key)
            if value is None or value == () or (concept.role == "instance" and key in PRIOR_KEYS
                                                and key not in PRIOR_USES[concept.prior]):
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _toml_value(value) -> str:
    """TOML for the values a concept holds (JSON's string escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value.expanduser().resolve()))
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def dataset_from_args(args: argparse.Namespace, defaults: dict) -> DatasetConfig:
    """The run's dataset: the file, or the one concept of the single-folder flags."""
    if args.dataset_config:
        refuse_data_flags(args, defaults)
        return load_dataset_config(args.dataset_config)
    for flag in ("instance_data_dir", "instance_prompt"):  # one message per flag, so the UI shows it at its field
        if not getattr(args, flag):
            raise UserInputError(f"--{flag} is missing (or give a --dataset_config file)")
    return from_args(args)
