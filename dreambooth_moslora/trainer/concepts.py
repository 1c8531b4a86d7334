"""The dataset's concepts as training examples: each subject's photos with its captions, masks and loss weight, and
the class examples that keep its class (its own class images or base-model prior, or the shared class concepts).

The photos are read before any model loads, so a bad folder stops the run there; class images are read after the
missing ones are generated, which needs the models (`TrainingData.training_set`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..adapter.errors import UserInputError
from .data import Example, Subject, TrainingSet, image_files, read_examples
from .dataset_config import NO_CAPTIONS, Concept, DatasetConfig
from .masks import mask_finder
from .prior import base_model_prior_examples


@dataclass(frozen=True)
class TrainingData:
    dataset: DatasetConfig
    subjects: tuple[tuple[Example, ...], ...]
    """Each instance concept's examples, in the file's order."""
    shared_classes: tuple[Example, ...]
    """The class concepts' examples, each `repeats` times: the class set of the subjects without a prior."""
    resolution: int
    bucketing: bool

    @property
    def instance_examples(self) -> list[Example]:
        return [e for examples in self.subjects for e in examples]

    def training_set(self, make_class_images: Callable[[Concept], None]) -> TrainingSet:
        """The subjects with their class sets; `make_class_images(concept)` first writes a concept's missing class
        images into its class_data_dir (the trainer's, with the loaded models)."""
        subjects, class_sets, shared = [], [], None
        for concept, examples in zip(self.dataset.of_role("instance"), self.subjects):
            own = self._own_class_examples(concept, list(examples), make_class_images)
            if own:
                class_set = len(class_sets)
                class_sets.append(tuple(own))
            elif self.shared_classes:
                if shared is None:
                    shared = len(class_sets)
                    class_sets.append(self.shared_classes)
                class_set = shared
            else:
                class_set = None
            subjects.append(Subject(examples, concept.repeats, class_set))
        return TrainingSet(tuple(subjects), tuple(class_sets))

    def _own_class_examples(self, concept: Concept, examples: list[Example],
                            make_class_images: Callable[[Concept], None]) -> list[Example]:
        if concept.prior == "base_model":
            return base_model_prior_examples(examples, concept.instance_prompt, concept.class_prompt,
                                             list(concept.class_prompts), concept.prior_loss_weight)
        if concept.prior == "class_images":
            make_class_images(concept)
            # class images' captions are class-NNNNN.txt, whatever the subject's caption files are called
            return read_examples(concept.class_data_dir, concept.class_prompt, self.resolution, self.bucketing,
                                 is_class=True, loss_weight=concept.prior_loss_weight)
        return []


def read_concepts(dataset: DatasetConfig, resolution: int, bucketing: bool) -> TrainingData:
    """Every instance and class concept's photos (validation concepts' stay out of training: only their presence is
    checked)."""
    subjects = tuple(tuple(_read(dataset, c, c.instance_prompt, resolution, bucketing, is_class=False,
                                 find_mask=mask_finder(c.mask_dir, c.alpha_mask)))
                     for c in dataset.of_role("instance"))
    shared = tuple(e for c in dataset.of_role("class")
                   for e in _read(dataset, c, c.class_prompt, resolution, bucketing, is_class=True) * c.repeats)
    for concept in dataset.of_role("validation"):  # measured validation reads them once the models are loaded
        try:
            image_files(concept.image_dir)
        except UserInputError as error:
            raise UserInputError(f"{dataset.where(concept)}{error}") from None
    return TrainingData(dataset, subjects, shared, resolution, bucketing)


def _read(dataset: DatasetConfig, concept: Concept, caption: str, resolution: int, bucketing: bool, is_class: bool,
          find_mask=None) -> list[Example]:
    """read_examples with the concept's captions and weight; its errors name the concept."""
    extension = None if concept.caption_extension == NO_CAPTIONS else concept.caption_extension
    try:
        return read_examples(concept.image_dir, caption, resolution, bucketing, is_class=is_class, find_mask=find_mask,
                             caption_extension=extension, loss_weight=concept.loss_weight)
    except UserInputError as error:
        raise UserInputError(f"{dataset.where(concept)}{error}") from None

