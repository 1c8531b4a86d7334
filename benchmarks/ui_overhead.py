"""Does an open job page slow the training down? Steps/s of one run with the UI's page polling and without.

Starts `dreambooth-moslora ui`, queues the pre-filled mini-model job (the quick start's recipe, without mid-run
validation, long enough), then alternates windows of --window seconds: in one, what an open job page asks (its
status every second, the job list every two, as ui.js does); in the other, nothing. The steps done in each window
are read from the job's train.log at its edges, alike in both. Writes benchmarks/ui-overhead.json and .md: the
median over pairs of (steps/s while polled) / (steps/s while not).

    HF_HUB_OFFLINE=1 python benchmarks/ui_overhead.py        # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_moslora.ui.form import first_run_values  # noqa: E402
from dreambooth_moslora.ui.progress import training_progress  # noqa: E402

TOKEN = "benchmark"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(url: str, data: bytes | None = None, content_type: str | None = None):
    request = urllib.request.Request(url, data=data, headers={"X-Token": TOKEN, **(
        {"Content-Type": content_type} if content_type else {})})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def queue_long_job(base: str, steps: int) -> str:
    """The pre-filled form, mid-run validation left out (its sampling would land in some windows only)."""
    form = first_run_values()
    for option in ("validation_steps", "validation_prompt", "num_validation_images", "validation_metrics_model"):
        form["advanced"].pop(option)
    form["advanced"].update(max_train_steps=str(steps), checkpointing_steps=str(steps))
    boundary = "----benchmark"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"form\"\r\n\r\n{json.dumps(form)}\r\n"
            f"--{boundary}--\r\n").encode()
    return call(f"{base}/api/jobs", body, f"multipart/form-data; boundary={boundary}")["id"]


def wait_for_steps(log: Path, at_least: int, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while training_progress(log)["step"] < at_least:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the job did not reach step {at_least}: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def window(base: str, job_id: str, log: Path, seconds: float, polled: bool) -> float:
    """Steps per second over one window, the page polling or not."""
    start_step, start = training_progress(log)["step"], time.monotonic()
    ticks = 0
    while time.monotonic() - start < seconds:
        if polled:
            call(f"{base}/api/jobs/{job_id}")
            if ticks % 2 == 0:
                call(f"{base}/api/jobs")
        ticks += 1
        time.sleep(max(0.0, start + ticks - time.monotonic()))
    return (training_progress(log)["step"] - start_step) / (time.monotonic() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--window", type=float, default=10.0)
    args = parser.parse_args(argv)
    jobs, port = Path(tempfile.mkdtemp(prefix="ui-overhead-")), free_port()
    base = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([sys.executable, "-m", "dreambooth_moslora.verbs.cli", "ui", "--jobs_dir", str(jobs),
                           "--port", str(port), "--token", TOKEN], cwd=ROOT, stdout=subprocess.DEVNULL,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for _ in range(120):
            try:
                call(f"{base}/api/jobs")
                break
            except OSError:
                time.sleep(0.5)
        job_id = queue_long_job(base, steps=100_000)
        log = jobs / job_id / "train.log"
        wait_for_steps(log, 20)  # past loading and caching
        ratios, rates = [], {"polled": [], "unpolled": []}
        for pair in range(args.pairs):  # the order alternates too, so a drift hits both alike
            order = (True, False) if pair % 2 == 0 else (False, True)
            rate = {polled: window(base, job_id, log, args.window, polled) for polled in order}
            rates["polled"].append(rate[True])
            rates["unpolled"].append(rate[False])
            ratios.append(rate[True] / rate[False])
            print(f"pair {pair}: {rate[True]:.2f} steps/s polled, {rate[False]:.2f} not: {ratios[-1]:.3f}", flush=True)
        call(f"{base}/api/jobs/{job_id}/cancel", b"{}", "application/json")
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    result = {"command": "python " + " ".join(sys.argv), "window_s": args.window, "rates": rates,
              "ratios": ratios, "median_ratio": statistics.median(ratios),
              "ratio_range": [min(ratios), max(ratios)]}
    stem = ROOT / "benchmarks" / "ui-overhead"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(
        f"`{result['command']}`\n\nSteps/s of one mini-model training with the job page's polling against without, "
        f"{args.pairs} pairs of {args.window:g} s windows: median ratio {result['median_ratio']:.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}); polled {statistics.median(rates['polled']):.2f} steps/s, "
        f"not polled {statistics.median(rates['unpolled']):.2f}.\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
