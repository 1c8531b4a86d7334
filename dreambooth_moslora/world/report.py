"""The personalization benchmark's report: summaries with paired tests, tables, the sample figure, the curve plot.

Pure functions of the results dict that `personalization.run_benchmark` writes, so a report can be remade from
results.json without training anything.
"""

from __future__ import annotations

import itertools
import random
import statistics

from PIL import Image, ImageDraw

from .render import IMAGE_SIZE

BASELINE = "lora"
MEASURES = ("subject_fidelity", "normalized_fidelity", "oracle_normalized_fidelity", "prompt_fidelity",
            "class_shape_accuracy", "class_subject_similarity")
HEADERS = ("subject fidelity ↑", "normalised (real ceiling) ↑", "normalised (oracle ceiling) ↑", "prompt fidelity ↑",
           "class shape accuracy ↑", "class-subject similarity ↓")
PAIRED = ("subject_fidelity", "prompt_fidelity", "class_shape_accuracy")
COMPARED = ("normalized_fidelity", "prompt_fidelity", "class_shape_accuracy", "class_subject_similarity")


def normalized(fidelity: float, floor: float, ceiling: float) -> float:
    """0 at the untrained model, 1 at the ceiling."""
    return (fidelity - floor) / (ceiling - floor)


def sign_flip_p_value(differences: list[float]) -> float:
    """Two-sided paired permutation test: how often random signs give a mean difference at least as large."""
    observed = abs(sum(differences))
    if len(differences) <= 16:
        flips = itertools.product((1, -1), repeat=len(differences))
    else:
        rng = random.Random(0)
        flips = ([rng.choice((1, -1)) for _ in differences] for _ in range(20_000))
    totals = [abs(sum(s * d for s, d in zip(signs, differences))) for signs in flips]
    return sum(t >= observed - 1e-12 for t in totals) / len(totals)


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _prior_label(prior: bool) -> str:
    return "prior" if prior else "no prior"


def summarize(results: dict) -> dict:
    """Mean and std over subjects and seeds per (method, prior), and each method paired with LoRA."""
    runs = results["runs"]
    summary = {"methods": {}, "paired_vs_lora": {}}
    groups = sorted({(r["method"], r["prior_preservation"]) for r in runs},
                    key=lambda g: (results["settings"]["methods"].index(g[0]), not g[1]))
    for method, prior in groups:
        chosen = runs_of(runs, method, prior)
        key = f"{method}|{_prior_label(prior)}"
        summary["methods"][key] = {m: _mean_std([r[m] for r in chosen]) for m in MEASURES if m in chosen[0]}
        baseline = runs_of(runs, BASELINE, prior)
        if method == BASELINE or not baseline:
            continue
        summary["paired_vs_lora"][key] = paired_differences(chosen, baseline, PAIRED)
    subjects = results["subjects"].values()
    summary["untrained"] = {m: _mean_std([s["untrained"][m] for s in subjects]) for m in MEASURES if m in
                            next(iter(subjects))["untrained"]}
    summary["real_vs_real"] = _mean_std([s["real_vs_real"] for s in subjects])
    if all("oracle" in s for s in subjects):
        summary["oracle"] = _mean_std([s["oracle"] for s in subjects])
    return summary


def runs_of(runs: list[dict], method: str, prior: bool) -> list[dict]:
    return [r for r in runs if r["method"] == method and r["prior_preservation"] == prior]


def paired_differences(runs: list[dict], baseline: list[dict], measures=PAIRED) -> dict:
    """Each run against the baseline run of the same subject and seed: per measure, the mean difference and the
    sign-flip test's p."""
    by_pair = {(r["subject"], r["seed"]): r for r in baseline}
    pairs = [(r, by_pair[(r["subject"], r["seed"])]) for r in runs if (r["subject"], r["seed"]) in by_pair]
    return {m: {"mean_difference": statistics.fmean(a[m] - b[m] for a, b in pairs),
                "p_value": sign_flip_p_value([a[m] - b[m] for a, b in pairs]), "pairs": len(pairs)}
            for m in measures}


def comparison_table(before: dict, after: dict, measures=COMPARED) -> str:
    """Two benchmark results (e.g. a recipe and a change to it), each method paired across them on the same
    subject and seed: what the change did, with its sign-flip p."""
    lines = ["| method | prior preservation | pairs | " + " | ".join(f"Δ {m.replace('_', ' ')} | p" for m in measures) + " |",
             "| --- | --- | --- | " + " | ".join("--- | ---" for _ in measures) + " |"]
    groups = sorted({(r["method"], r["prior_preservation"]) for r in after["runs"]})
    for method, prior in groups:
        baseline = runs_of(before["runs"], method, prior)
        if not baseline:
            continue
        paired = paired_differences(runs_of(after["runs"], method, prior), baseline, measures)
        cells = " | ".join(f"{paired[m]['mean_difference']:+.3f} | {paired[m]['p_value']:.2f}" for m in measures)
        lines.append(f"| {method} | {_prior_label(prior)} | {paired[measures[0]]['pairs']} | {cells} |")
    return "\n".join(lines) + "\n"


def _cell(stats: dict | None) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats else ""


def results_table(results: dict) -> str:
    summary = results["summary"]
    lines = ["| method | prior preservation | " + " | ".join(HEADERS) + " |", "| --- " * (2 + len(HEADERS)) + "|"]
    for key, row in summary["methods"].items():
        method, prior = key.split("|")
        lines.append(f"| {method} | {prior} | " + " | ".join(_cell(row.get(m)) for m in MEASURES) + " |")
    floor = summary["untrained"]
    lines.append("| untrained (floor) | | " + " | ".join(_cell(floor.get(m)) for m in MEASURES) + " |")
    lines.append(f"| real vs real (ceiling) | | {_cell(summary['real_vs_real'])} |" + " |" * (len(MEASURES) - 1))
    if "oracle" in summary:
        lines.append(f"| oracle: true renders on the prompts' backgrounds, through the VAE | | {_cell(summary['oracle'])} |"
                     + " |" * (len(MEASURES) - 1))
    lines += ["", "Paired with LoRA on the same subject and seed (two-sided sign-flip permutation test):", "",
              "| method | prior preservation | Δ subject fidelity | p | Δ prompt fidelity | p | Δ class shape accuracy | p |",
              "| --- " * 8 + "|"]
    for key, row in summary["paired_vs_lora"].items():
        method, prior = key.split("|")
        cells = " | ".join(f"{row[m]['mean_difference']:+.4f} | {row[m]['p_value']:.3f}" for m in PAIRED)
        lines.append(f"| {method} | {prior} | {cells} |")
    lines += ["", "Per subject (mean over seeds) and the step each seed was reported at:", "",
              "| method | prior preservation | subject | normalised (real ceiling) | normalised (oracle ceiling) | "
              "class shape accuracy | steps |", "| --- " * 7 + "|"]
    for (method, prior, subject), runs in _by_subject(results["runs"]).items():
        means = [statistics.fmean(r[m] for r in runs) for m in
                 ("normalized_fidelity", "oracle_normalized_fidelity", "class_shape_accuracy")]
        steps = ", ".join(str(r["step"]) for r in runs)
        lines.append(f"| {method} | {_prior_label(prior)} | {subject} | " + " | ".join(f"{v:.3f}" for v in means)
                     + f" | {steps} |")
    return "\n".join(lines) + "\n"


def _by_subject(runs: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["prior_preservation"], run["subject"]), []).append(run)
    return groups


def sample_figure(rows: list[tuple[str, dict]], per_column: int = 3, zoom: int = 3) -> Image.Image:
    """One row per subject: real images, the untrained model, then each method (seed 0)."""
    cell, label_height = IMAGE_SIZE * zoom, 14
    columns = list(rows[0][1])
    width = len(columns) * per_column * cell + (len(columns) - 1) * 4
    figure = Image.new("RGB", (width, label_height + len(rows) * (cell + 4)), "white")
    draw = ImageDraw.Draw(figure)
    for c, column in enumerate(columns):
        left = c * (per_column * cell + 4)
        draw.text((left + 2, 1), column, fill="black")
        for r, (_, images) in enumerate(rows):
            for k, image in enumerate(images[column][:per_column]):
                figure.paste(image.resize((cell, cell), Image.NEAREST), (left + k * cell, label_height + r * (cell + 4)))
    return figure


def curve_summary(results: dict, measure: str = "normalized_fidelity") -> dict[str, list[tuple[int, float, float]]]:
    """method → [(step, mean, std)] over subjects and seeds, from the checkpoint measurements."""
    curves: dict[str, dict[int, list[float]]] = {}
    for point in results.get("curves", []):
        curves.setdefault(point["method"], {}).setdefault(point["step"], []).append(point[measure])
    return {method: [(step, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                     for step, v in sorted(by_step.items())] for method, by_step in curves.items()}


CURVE_COLOURS = ((200, 60, 40), (40, 90, 200), (40, 150, 70), (150, 60, 170), (220, 140, 20))


def curve_plot(curves: dict[str, list[tuple[int, float, float]]], title: str, y_label: str,
               size: tuple[int, int] = (560, 360)) -> Image.Image:
    """A line chart of each method's mean (± std as a band of bars) against training steps."""
    width, height = size
    left, right, top, bottom = 60, 150, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = sorted({s for points in curves.values() for s, _, _ in points})
    values = [v for points in curves.values() for _, m, d in points for v in (m - d, m + d)]
    low, high = min(0.0, min(values)), max(1.0, max(values))

    def xy(step, value):
        x = left + (width - left - right) * (steps.index(step) / max(1, len(steps) - 1))
        return x, top + (height - top - bottom) * (1 - (value - low) / (high - low))

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for tick in (low, (low + high) / 2, high):
        _, y = xy(steps[0], tick)
        draw.text((4, y - 6), f"{tick:.2f}", fill="black")
    for step in steps:
        x, _ = xy(step, low)
        draw.text((x - 10, height - bottom + 6), str(step), fill="black")
    draw.text((left, 4), title, fill="black")
    draw.text((width // 2 - 40, height - 16), "training steps", fill="black")
    draw.text((4, top - 12), y_label, fill="black")
    for index, (method, points) in enumerate(curves.items()):
        colour = CURVE_COLOURS[index % len(CURVE_COLOURS)]
        draw.line([xy(s, m) for s, m, _ in points], fill=colour, width=3)
        for s, m, d in points:
            (x, y0), (_, y1) = xy(s, m - d), xy(s, m + d)
            draw.line([(x, y0), (x, y1)], fill=colour, width=1)
            draw.ellipse((x - 3, xy(s, m)[1] - 3, x + 3, xy(s, m)[1] + 3), fill=colour)
        draw.text((width - right + 10, top + 16 * index), method, fill=colour)
    return image
