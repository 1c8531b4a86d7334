"""Draws the quick start's subject for the mini model: five photos of the striped hexagram, a novel object of
the mini world (red and yellow stripes on a six-pointed star, which pretraining never showed).

Run: python assets/make_world_subject.py  (rewrites assets/world-subject/*.png; the benchmark draws the same five)
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dreambooth_moslora.world.subjects import subject_by_name, write_instance_images  # noqa: E402

if __name__ == "__main__":
    for path in write_instance_images(subject_by_name("striped-hexagram"), HERE / "world-subject", count=5, seed=0):
        print(path)
