"""Pair two personalization benchmarks run by run (same subject, same seed): what a change to the recipe did.

    python benchmarks/compare_personalization.py benchmarks/personalization/selected \\
        benchmarks/personalization/selected-trigger
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dreambooth_moslora.world.report import comparison_table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="a benchmark output folder (its results.json), the baseline")
    parser.add_argument("after", help="another, run on the same subjects and seeds with the change")
    args = parser.parse_args(argv)
    before, after = (json.loads((Path(folder) / "results.json").read_text()) for folder in (args.before, args.after))
    print(comparison_table(before, after), end="")


if __name__ == "__main__":
    main()
