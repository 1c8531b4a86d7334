"""Draws the quick start's subject for the mini model: five photos of the striped hexagram, a novel object of
the mini world (red and yellow stripes on a six-pointed star, which pretraining never showed), each with a
caption naming its background, and the class prompts the quick start's prior preservation generates stars from.

Run: python assets/make_world_subject.py  (rewrites assets/world-subject/ and assets/world-class-prompts.txt; the
benchmark draws the same five photos and the same prompts)
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dreambooth_moslora.adapter.files import write_text_atomically  # noqa: E402
from dreambooth_moslora.world.personalization import BenchmarkSettings, class_prompts  # noqa: E402
from dreambooth_moslora.world.subjects import subject_by_name, write_instance_images  # noqa: E402

if __name__ == "__main__":
    subject = subject_by_name("striped-hexagram")
    for path in write_instance_images(subject, HERE / "world-subject", count=5, seed=0, caption_token="sks"):
        print(path, path.with_suffix(".txt").read_text().strip())
    prompts = class_prompts(subject, BenchmarkSettings("", "", "").class_prompts)
    print(write_text_atomically(HERE / "world-class-prompts.txt", "\n".join(prompts) + "\n"))
