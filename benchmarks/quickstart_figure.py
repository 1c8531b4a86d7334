"""The README's quick-start figure: the subject's photos, then a row of validation samples per saved step.

    python benchmarks/quickstart_figure.py outputs/quickstart docs/quickstart-samples.png
"""

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dreambooth_moslora.trainer.data import image_files  # noqa: E402

CELL, LABEL, COLUMNS = 128, 14, 4


def _step_of(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def _row(label: str, images: list[Image.Image]) -> Image.Image:
    row = Image.new("RGB", (COLUMNS * CELL, LABEL + CELL), "white")
    ImageDraw.Draw(row).text((2, 1), label, fill="black")
    for index, image in enumerate(images[:COLUMNS]):
        row.paste(image.convert("RGB").resize((CELL, CELL), Image.NEAREST), (index * CELL, LABEL))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="the quick start's --output_dir")
    parser.add_argument("figure", type=Path)
    parser.add_argument("--photos", type=Path, default=ROOT / "assets" / "world-subject")
    args = parser.parse_args()
    photos = image_files(args.photos)
    rows = [_row(f"the {len(photos)} photos ({min(len(photos), COLUMNS)} shown)", [Image.open(p) for p in photos])]
    for folder in sorted((args.output_dir / "validation").iterdir(), key=_step_of):
        samples = sorted(folder.glob("000-*.png"))
        prompt = json.loads(Image.open(samples[0]).text["dreambooth_moslora"])["prompt"]
        rows.append(_row(f"samples at step {_step_of(folder)}: '{prompt}'", [Image.open(p) for p in samples]))
    figure = Image.new("RGB", (COLUMNS * CELL, sum(r.height for r in rows)), "white")
    for index, row in enumerate(rows):
        figure.paste(row, (0, index * row.height))
    figure.save(args.figure)
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
