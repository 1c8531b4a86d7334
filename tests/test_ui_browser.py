"""End to end in a real browser: `dreambooth-moslora ui` started as a user would, headless Chromium driven by
Playwright through a whole mini-model run: start the pre-filled job, watch progress and samples, cancel, resume
(across a restart of the UI), finish, generate from the best step, download the kohya file and load it. And a page
served from another local port, with the UI's cookie in the same browser, can start nothing and see nothing.

UI_SCREENSHOTS=docs also writes the screenshots the README shows (docs/ui-*.png).
"""

import html
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("UI_TEST_CHROMIUM", "/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install -e \".[test]\")")
pytest.importorskip("fastapi", reason="the UI needs its extra (pip install -e \".[ui]\")")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"the browser test needs Chromium at {CHROMIUM} (or set UI_TEST_CHROMIUM)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_MS = 90_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ui(jobs: Path, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """The real command; returns the process and the URL it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "dreambooth_moslora.verbs.cli", "ui", "--jobs_dir",
                                    str(jobs), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"open (http://\S+)", log.read_text())
        if found and _answers(found.group(1)):
            return process, found.group(1)
        assert process.poll() is None, log.read_text()
        time.sleep(0.2)
    raise AssertionError(f"the UI did not start: {log.read_text()}")


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def stop_ui(process: subprocess.Popen):
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)


def serve_other_page(folder: Path) -> tuple[ThreadingHTTPServer, int]:
    """Another local web server (a notebook, a dev server, a downloaded page), on a port of its own."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def other_pages(folder: Path, ui: str):
    """Two pages that try what a page on another port could: post a job (the first run's, which would start) and
    cancel one by script with the browser's cookies, load one of the user's photos as an image; and submit a form."""
    from dreambooth_moslora.ui.form import first_run_values

    form = json.dumps(first_run_values())
    image = f"{ui}/api/folder/image?path={ROOT / 'assets' / 'world-subject'}&name=00.png"
    (folder / "script.html").write_text(f"""<!doctype html><title>trying</title><img id="photo" src="{image}">
<script>
const form = new FormData();
form.append("form", {json.dumps(form)});
const options = (body) => ({{ method: "POST", body, mode: "no-cors", credentials: "include" }});
window.onload = () => Promise.allSettled([fetch("{ui}/api/jobs", options(form)),
    fetch("{ui}/api/jobs/x/cancel", options(undefined))])
  .then(() => {{ document.title = "done: the photo " + (photo.naturalWidth ? "loaded" : "refused"); }});
</script>""")
    (folder / "form.html").write_text(f"""<!doctype html><title>a form</title>
<form id="f" method="POST" action="{ui}/api/jobs" enctype="multipart/form-data">
<input name="form" value="{html.escape(form)}"></form><script>document.getElementById("f").submit();</script>""")


def shoot(page, name: str, tmp_path: Path, full_page: bool = False):
    target = Path(os.environ["UI_SCREENSHOTS"]) if os.environ.get("UI_SCREENSHOTS") else tmp_path
    page.screenshot(path=str(target / f"ui-{name}.png"), full_page=full_page)


def test_a_mini_model_run_from_the_browser(tmp_path):
    from safetensors import safe_open

    jobs, port = tmp_path / "jobs", free_port()
    ui, url = start_ui(jobs, port, tmp_path / "ui-1.log")
    try:
        with playwright_api.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 760}, accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            missing = []  # every request of the pages must find what it asks for (the favicon too)
            page.on("response", lambda response: response.status == 404 and f":{port}/" in response.url
                    and missing.append(response.url))
            page.goto(url)  # the UI's cookie is set: another page of this host now sends it too

            other, other_port = serve_other_page(tmp_path)
            other_pages(tmp_path, f"http://127.0.0.1:{port}")
            page.goto(f"http://127.0.0.1:{other_port}/script.html")
            page.wait_for_function("document.title.startsWith('done')")
            assert page.title() == "done: the photo refused"
            page.goto(f"http://127.0.0.1:{other_port}/form.html")  # lands on the UI's refusal
            page.wait_for_url(f"http://127.0.0.1:{port}/api/jobs")
            assert "only the UI's own page" in page.text_content("body")
            other.shutdown()
            page.goto(url)
            assert page.evaluate("fetch('/api/jobs').then(r => r.json()).then(d => d.jobs.length)") == 0
            # the offline first run: the bundled mini model and subject, captions shown beside the photos
            assert page.input_value("[name=pretrained_model_name_or_path]").endswith("mini-sdxl")
            page.wait_for_selector("#photos textarea[data-photo='01.png']")
            assert "blue background" in page.input_value("#photos textarea[data-photo='01.png']")
            page.set_input_files("#upload", [str(ROOT / "assets" / "world-subject" / "00.png")])  # uploads preview
            page.wait_for_selector("#photos img[src^='blob:']")
            assert page.locator("#photos textarea").count() == 1
            page.click("#load-folder")  # back to the folder
            page.wait_for_selector("#photos textarea[data-photo='04.png']")
            page.click("#plan")  # the memory plan's presets, marked per card size
            page.wait_for_selector("#presets tr:has-text('--low_memory') .fits:has-text('8 GB')")
            shoot(page, "form", tmp_path, full_page=True)
            page.click("#advanced summary")
            # bad input: the CLI's one-line error at its field, the folded Advanced section opened to show it, and
            # nothing started
            page.fill("#adv-resolution", "30")
            page.click("#advanced summary")  # folded again
            page.click("#start")
            page.wait_for_selector(".error[data-for=resolution]:has-text('multiple of 8')")
            assert page.evaluate("document.querySelector('#advanced').open")
            page.fill("#adv-resolution", "32")
            page.fill("#adv-learning_rate", "-1e-3")
            page.click("#start")
            page.wait_for_selector(".error[data-for=learning_rate]:has-text('must be a positive number, got -0.001')")
            page.fill("#adv-learning_rate", "1e-3")
            assert page.evaluate("fetch('/api/jobs').then(r => r.json()).then(d => d.jobs.length)") == 0
            for option, value in {"max_train_steps": "60", "validation_steps": "20",
                                  "checkpointing_steps": "20", "num_validation_images": "1",
                                  "num_inference_steps": "8"}.items():
                page.fill(f"#adv-{option}", value)
            page.click("#copy")
            page.wait_for_selector("#command:has-text('--max_train_steps 60')")
            page.click("#start")

            page.wait_for_url(re.compile(r"/jobs/"))
            page.wait_for_function("document.querySelector('#bar').value >= 1")  # progress
            page.wait_for_selector("#samples tbody tr[data-step='0'] img")  # the first samples (step 0)
            page.wait_for_selector("#metrics circle")  # one validation is a dot, not a blank chart
            page.wait_for_function("/validation/.test(document.querySelector('#steps').textContent)")
            assert re.search(r"steps/s, about .* left.* validation", page.text_content("#steps"))
            page.click("#cancel")  # SIGINT: a checkpoint is saved
            page.wait_for_selector("#state:text-is('stopped')")
            assert "--resume_from_checkpoint latest" in page.text_content("#message")
            page.click("#resume")
            page.wait_for_selector("#state:text-is('running')")

            job_page, job_id = page.url, page.url.rsplit("/", 1)[1]
            stop_ui(ui)  # the training goes on without the UI, which finds it again
            ui, second_url = start_ui(jobs, port, tmp_path / "ui-2.log")
            assert second_url == url  # the jobs folder's token: the open tab goes on working
            assert page.evaluate(f"fetch('/api/jobs/{job_id}').then(r => r.status)") == 200
            page.evaluate("document.querySelector('meta[name=ui-token]').content = 'an old token'")
            page.wait_for_selector("#refused:has-text('open the URL it printed')")  # said, not frozen
            page.goto(url)  # the jobs list: one job of this name, told apart by when it was made and its id
            page.wait_for_selector(f"#jobs tr[data-job='{job_id}'] td.muted:has-text('{job_id}')")
            page.goto(job_page)
            page.wait_for_selector("#state:text-is('finished')")
            page.wait_for_selector("#samples tr.best img")  # the chosen step, highlighted
            assert page.locator("#samples tbody tr").count() >= 4  # 0, 20, 40 and final 60
            assert page.locator("#loss polyline").count() == 2  # the loss and its running mean
            # the measures: each in its colour with what it means, the legend clear of the chosen step's mark
            legend = page.locator("#metrics-figure .legend li").all_text_contents()
            assert len(legend) == 3 and legend[-1].endswith("the chosen step (best/)")
            assert any(t.startswith("subject likeness") for t in legend)
            assert any(t.startswith("class_similarity how much the class prompt") for t in legend)
            colours = page.eval_on_selector_all("#metrics-figure .legend .swatch:not(.marked)",
                                                "nodes => nodes.map(n => getComputedStyle(n).backgroundColor)")
            assert len(set(colours)) == 2 and "rgb(107, 114, 128)" not in colours  # not the axis grey
            mark = page.locator("#metrics line.marked").bounding_box()
            key = page.locator("#metrics-figure .legend").bounding_box()
            assert key["y"] >= mark["y"] + mark["height"]  # below the plot, never over the mark
            # Generate's adapter followed the run to best/ (it showed a checkpoint while the job ran)
            assert page.input_value("#generate [name=checkpoint]") == "best"
            page.fill("#generate [name=prompts]", "a photo of sks star on a green background")
            page.fill("#generate [name=count]", "1")
            page.fill("#generate [name=steps]", "8")
            page.click("#generate button")
            page.wait_for_selector("#generated .generation.done img")
            assert "Seed: 0" in page.text_content("#generated .parameters")
            shoot(page, "job", tmp_path, full_page=True)

            with page.expect_download() as download:
                page.click("#downloads tr:has(td:text-is('best')) a[data-format=kohya]")
            saved = tmp_path / "kohya.safetensors"
            download.value.save_as(saved)
            with safe_open(saved, "pt") as kohya:
                assert any(key.startswith("lora_unet_") for key in kohya.keys())

            assert missing == []  # checked before the job is deleted: a poll still in flight then finds no job
            page.once("dialog", lambda dialog: dialog.accept())  # "Delete the job … with its adapters?"
            page.click("#delete")
            page.wait_for_url(re.compile(r"/$"))
            assert page.evaluate("fetch('/api/jobs').then(r => r.json()).then(d => d.jobs.length)") == 0
            browser.close()
    finally:
        if ui.poll() is None:
            stop_ui(ui)
