"""Measured validation: the DreamBooth metrics (metrics.py) on the samples of each validation step, their
history as JSON lines, and a self-contained HTML report of samples and curves.

The prompt set is fixed for a run and sampled with the same seeds at every step, so steps compare on equal terms:
the user's validation prompts, the subject in a few other contexts, and the class prompt (class drift).
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..adapter.errors import UserInputError
from ..adapter.files import write_text_atomically
from ..pipeline.metrics import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    ClipEmbedder,
    DinoEmbedder,
    mean_cross_similarity,
    mean_paired_similarity,
)
from ..world.analyzer import embed, load_analyzer
from .prior import without_words
from .prompt_words import trigger_words as find_trigger_words

CONTEXTS = (", on a beach", ", in the snow", ", on a wooden table")
THUMBNAIL = 128


@dataclass(frozen=True)
class ValidationPrompt:
    prompt: str  # as sampled (with the trigger)
    plain: str  # the same without the trigger word(s), for CLIP-T
    kind: str  # "user", "context" or "class"


def validation_prompts(instance_prompt: str, user_prompts: list[str], class_prompt: str | None,
                       trigger_words) -> list[ValidationPrompt]:
    """The user's prompts, the instance prompt in CONTEXTS, then the class prompt; each prompt once, since the
    samples are keyed by prompt text. trigger_words None: those prompt_words.trigger_words finds."""
    found = find_trigger_words(instance_prompt, class_prompt) if trigger_words is None else trigger_words
    words = {word.lower() for word in found}
    subject = [(p, "user") for p in user_prompts] + [(instance_prompt.rstrip(" .,") + c, "context") for c in CONTEXTS]
    prompts, seen = [], set()
    for prompt, kind in subject + ([(class_prompt, "class")] if class_prompt else []):
        if prompt not in seen:
            seen.add(prompt)
            plain = prompt if kind == "class" else without_words(prompt, words)
            prompts.append(ValidationPrompt(prompt, plain, kind))
    return prompts


def _offline_hint(option: str, error: UserInputError) -> UserInputError:
    return UserInputError(f"{error}; measured validation needs it downloaded once (or a local folder offline): "
                          f"set {option}")


class FeatureModels:
    """DINO + CLIP, or the mini world's analyzer (subject embedder only: it cannot read text, so no CLIP-T).
    Loaded once and kept on the CPU, so they take none of the accelerator's memory."""

    def __init__(self, dino: DinoEmbedder | None = None, clip: ClipEmbedder | None = None, analyzer=None):
        self.dino, self.clip, self.analyzer = dino, clip, analyzer

    @classmethod
    def load(cls, dino: str | None, clip: str | None, analyzer: str | None) -> "FeatureModels":
        """The analyzer file when given, else DINO and CLIP (hub ids or local folders; None: evaluate's defaults)."""
        if analyzer is not None:
            try:
                return cls(analyzer=load_analyzer(analyzer))
            except UserInputError as error:
                raise UserInputError(f"{error}: set --validation_metrics_model to a world analyzer file "
                                     "(such as assets/world-analyzer.safetensors)") from None
        try:
            dino_model = DinoEmbedder(dino or DEFAULT_DINO)
        except UserInputError as error:
            raise _offline_hint("--validation_dino_model", error) from None
        try:
            clip_model = ClipEmbedder(clip or DEFAULT_CLIP)
        except UserInputError as error:
            raise _offline_hint("--validation_clip_model", error) from None
        return cls(dino=dino_model, clip=clip_model)

    def _subject_embedders(self) -> dict:
        """Metric name -> image embedder for subject fidelity; the first one also measures the class."""
        if self.analyzer is not None:
            return {"subject": lambda images: embed(self.analyzer, images)}
        return {"dino": self.dino.images, "clip_i": self.clip.images}

    def measure(self, samples: dict[str, list[Image.Image]], prompts: list[ValidationPrompt],
                instance_images: list[Image.Image]) -> dict[str, float]:
        """Subject fidelity ("dino" and "clip_i", or the analyzer's "subject") and prompt fidelity ("clip_t",
        not with the analyzer) of the non-class samples; "class_similarity" of the class samples to the
        instance photos with the first subject embedder, when a class prompt is among the prompts."""
        subject = [p for p in prompts if p.kind != "class"]
        images = [image for p in subject for image in samples[p.prompt]]
        results = {}
        for name, embedder in self._subject_embedders().items():
            results[name] = mean_cross_similarity(embedder(images), embedder(instance_images))
        if self.clip is not None:
            texts = [p.plain for p in subject for _ in samples[p.prompt]]
            results["clip_t"] = mean_paired_similarity(self.clip.images(images), self.clip.texts(texts))
        class_images = [image for p in prompts if p.kind == "class" for image in samples[p.prompt]]
        if class_images:
            embedder = next(iter(self._subject_embedders().values()))
            results["class_similarity"] = mean_cross_similarity(embedder(class_images), embedder(instance_images))
        return results


def append_metrics(path, record: dict):
    """Add one step's record (it needs "step"), dropping any at that step or later: a resumed run rewrites the
    future it left. The whole file is rewritten atomically, so a crash, even a power cut mid-write, leaves the
    old file or the new one, never a torn line; at one line per validation the rewrite costs nothing."""
    kept = [r for r in read_metrics(path) if r["step"] < record["step"]]
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in kept + [record]))


def scalars(record: dict) -> dict[str, float]:
    """A record's measures as flat numbers, each subject's of a several-subject run as "name/measure": what
    tensorboard, the report's curves and the UI can plot."""
    flat = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    for name, own in record.get("subjects", {}).items():
        flat.update({f"{name}/{k}": v for k, v in own.items() if isinstance(v, (int, float))})
    return flat


def read_metrics(path, up_to_step: int | None = None) -> list[dict]:
    """The records in step order, less those after up_to_step (a resume's step); a missing file: none."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserInputError(f"{path} line {number} is not JSON ({error.msg}); delete the line or "
                                     "the file to start the metrics history again") from None
    records.sort(key=lambda r: r["step"])
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def _thumbnail(paths: list[Path]) -> str:
    """The images tiled in a near-square grid, shrunk to THUMBNAIL px, as a data: URL (no file beside the report).
    Each sheet is made once (keyed by its files and their modification times): the report is redrawn at every
    validation, and decoding every past step's samples again would grow with the run."""
    return _sheet(tuple((str(p), Path(p).stat().st_mtime_ns) for p in paths))


@functools.lru_cache(maxsize=4096)
def _sheet(files: tuple[tuple[str, int], ...]) -> str:
    images = [Image.open(path).convert("RGB") for path, _ in files]
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image.resize((width, height)), ((index % columns) * width, (index // columns) * height))
    sheet.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(paths: list[Path], title: str) -> str:
    return f'<img src="{_thumbnail(paths)}" title="{html.escape(title)}" alt="{html.escape(title)}">'


def _chart(name: str, history: list[dict], chosen_step: int | None) -> str:
    """One metric over the steps as an inline SVG polyline, the chosen step as a vertical line."""
    points = [(r["step"], r[name]) for r in history if isinstance(r.get(name), (int, float))]
    width, height, pad = 260, 120, 24
    steps, values = [s for s, _ in points], [v for _, v in points]
    low, high = min(values), max(values)
    first, last = min(steps), max(steps)

    def x(step):
        return pad + (step - first) / ((last - first) or 1) * (width - 2 * pad)

    def y(value):
        return height - pad - (value - low) / ((high - low) or 1) * (height - 2 * pad)

    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    dots = "".join(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5"><title>step {s}: {v:.4f}</title></circle>'
                   for s, v in points)
    marker = (f'<line x1="{x(chosen_step):.1f}" y1="{pad / 2}" x2="{x(chosen_step):.1f}" y2="{height - pad}" '
              'class="chosen-line"/>' if chosen_step is not None and first <= chosen_step <= last else "")
    return (f'<figure><figcaption>{html.escape(name)}</figcaption>'
            f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">{marker}'
            f'<polyline points="{line}" fill="none" stroke="#2563eb" stroke-width="1.5"/>{dots}'
            f'<text x="2" y="{pad}">{high:.3f}</text><text x="2" y="{height - pad}">{low:.3f}</text>'
            f'<text x="{pad}" y="{height - 4}">step {first}</text>'
            f'<text x="{width - pad}" y="{height - 4}" text-anchor="end">{last}</text></svg></figure>')


STYLE = """body{font-family:sans-serif;margin:1.5em}img{margin:2px;image-rendering:pixelated}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px;vertical-align:top;font-size:12px}
th{max-width:140px}tr.chosen{background:#fef3c7;outline:3px solid #f59e0b}figure{display:inline-block;margin:4px}
svg{background:#f8fafc}svg text{font-size:10px;fill:#475569}circle{fill:#2563eb}
.chosen-line{stroke:#f59e0b;stroke-width:2}"""


def write_report(path, history: list[dict], instance_images: list[Path],
                 samples_by_step: dict[int, dict[str, list[Path]]], prompts: list[ValidationPrompt],
                 chosen_step: int | None) -> Path:
    """validation/report.html: instance photos, one row per step and one column per prompt, the metric curves,
    the chosen step highlighted. Images are embedded and nothing is fetched, so it opens from disk anywhere."""
    history = [{"step": r["step"], **scalars(r)} for r in history]
    by_step = {r["step"]: r for r in history}
    metrics = list(dict.fromkeys(k for r in history for k in r if k != "step"))
    header = "".join(f"<th>{html.escape(p.prompt)}<br><small>{p.kind}</small></th>" for p in prompts)
    rows = []
    for step in sorted(samples_by_step):
        values = "".join(f"<br>{html.escape(m)} {by_step[step][m]:.3f}" for m in metrics
                         if isinstance(by_step.get(step, {}).get(m), (int, float)))
        label = f"<b>step {step}</b>{' (chosen)' if step == chosen_step else ''}<small>{values}</small>"
        cells = "".join(f"<td>{_img(samples_by_step[step][p.prompt], f'step {step}: {p.prompt}')}</td>"
                        if samples_by_step[step].get(p.prompt) else "<td></td>" for p in prompts)
        row_class = ' class="chosen"' if step == chosen_step else ""
        rows.append(f'<tr{row_class} id="step-{step}"><th>{label}</th>{cells}</tr>')
    chosen = f"step {chosen_step}" if chosen_step is not None else "none yet"
    text = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Validation</title><style>{STYLE}</style>'
            f'</head><body><h1>Validation</h1><p>Chosen checkpoint: <b>{chosen}</b></p>'
            f'<h2>Instance photos</h2><div>{"".join(_img([p], p.name) for p in instance_images)}</div>'
            f'<h2>Metrics</h2><div>{"".join(_chart(m, history, chosen_step) for m in metrics)}</div>'
            f'<h2>Samples</h2><table><tr><th>step</th>{header}</tr>{"".join(rows)}</table></body></html>\n')
    return write_text_atomically(path, text)
