"""The web app's API (FastAPI's TestClient): every endpoint, and its refusals (paths, uploads, malformed values,
tokens, hosts, other pages)."""

import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the UI needs its extra (pip install -e \".[ui]\")")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

from dreambooth_moslora.adapter.errors import UserInputError  # noqa: E402
from dreambooth_moslora.trainer.arguments import build_parser  # noqa: E402
from dreambooth_moslora.ui.app import create_app  # noqa: E402
from dreambooth_moslora.ui.form import first_run_values  # noqa: E402
from dreambooth_moslora.ui.photos import MAX_UPLOAD_BYTES  # noqa: E402
from dreambooth_moslora.ui.server import jobs_folder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = ROOT / "assets" / "world-subject"
LOCAL = "http://127.0.0.1"


def client_of(jobs, **options) -> TestClient:
    return TestClient(create_app(jobs, schedule=False, **options), base_url=LOCAL)


def png_bytes(size=(32, 32), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def quick_form(**advanced) -> dict:
    """The first-run form, made quick: no validation, two steps."""
    form = first_run_values()
    form["advanced"] = {**form["advanced"], "validation_prompt": "", "validation_metrics_model": "",
                        "max_train_steps": "2", "checkpointing_steps": "1", "report_to": "none", **advanced}
    return form


def create(client, form: dict, files=None):
    return client.post("/api/jobs", data={"form": json.dumps(form)}, files=files or [])


@pytest.fixture
def client(tmp_path):
    return client_of(tmp_path / "jobs")


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """A real two-step run of the bundled mini model, started by the app's queue as the UI starts it."""
    jobs = tmp_path_factory.mktemp("ui") / "jobs"
    with TestClient(create_app(jobs), base_url=LOCAL) as client:
        job_id = create(client, quick_form()).json()["id"]
        deadline = time.monotonic() + 180
        while client.get(f"/api/jobs/{job_id}").json()["state"] in ("waiting", "running", "new"):
            assert time.monotonic() < deadline, (jobs / job_id / "train.log").read_text()
            time.sleep(0.5)
    return jobs, job_id


def test_the_form_page_offers_every_train_option_of_the_parser(client):
    page = client.get("/")
    assert page.status_code == 200
    setup = json.loads(page.text.split('<script id="setup" type="application/json">')[1].split("</script>")[0])
    offered = {option["name"] for option in setup["options"]}
    parser_options = {a.option_strings[-1][2:] for a in build_parser()._actions
                      if a.option_strings and a.help != "==SUPPRESS==" and a.dest != "help"}
    basic = {"pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "class_prompt", "output_dir",
             "resume_from_checkpoint"}
    assert offered == parser_options - basic
    assert setup["values"]["pretrained_model_name_or_path"].endswith("mini-sdxl")  # the offline first run
    assert page.text.count("<script") == 2 and "http" not in page.text.split("<body")[0]  # no CDN
    assert client.get("/static/ui.js").status_code == 200


def test_check_gives_the_command_or_the_clis_error_at_its_field(client, tmp_path):
    form = first_run_values()
    checked = client.post("/api/check", json=form).json()
    assert checked["errors"] == {}
    assert checked["command"].startswith("dreambooth-moslora train --pretrained_model_name_or_path ")
    assert "--max_train_steps 200" in checked["command"]
    bad = client.post("/api/check", json={**form, "advanced": {**form["advanced"], "resolution": "33"}}).json()
    assert bad["errors"] == {"resolution": "--resolution must be a positive multiple of 8, got 33"}
    typo = client.post("/api/check", json={**form, "advanced": {"learning_rate": "fast"}}).json()
    assert "invalid float value: 'fast'" in typo["errors"]["learning_rate"]
    empty = client.post("/api/check", json={**form, "photos_folder": str(tmp_path)}).json()
    assert "no images" in empty["errors"]["photos"]
    assert client.post("/api/check", json={**form, "advanced": {"no_such_option": "1"}}).status_code == 400


def test_the_plan_marks_each_preset_against_each_card(client):
    presets = client.post("/api/plan", json=first_run_values()).json()["presets"]
    assert [p["name"] for p in presets][0] == "bf16" and len(presets) == 5
    assert all(set(p["fits"]) == {"8", "12", "16", "24"} and all(p["fits"].values()) for p in presets)  # 14 MB model


def test_a_named_folder_lists_and_serves_only_its_images(client, tmp_path):
    listed = client.get("/api/folder", params={"path": str(SUBJECT)}).json()
    assert [p["name"] for p in listed["photos"]] == ["00.png", "01.png", "02.png", "03.png", "04.png"]
    assert "blue background" in listed["photos"][1]["caption"]
    image = client.get("/api/folder/image", params={"path": str(SUBJECT), "name": "01.png"})
    assert image.status_code == 200 and image.content == (SUBJECT / "01.png").read_bytes()
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    linked = tmp_path / "photos"
    linked.mkdir()
    (linked / "link.png").symlink_to(outside)
    (linked / "ok.png").write_bytes(png_bytes())
    for folder, name in [(SUBJECT, "../../README.md"), (SUBJECT, str(SUBJECT / "01.png")), (SUBJECT, "01.txt"),
                         (linked, "link.png"), (SUBJECT, "..%2F..%2FREADME.md")]:
        refused = client.get("/api/folder/image", params={"path": str(folder), "name": name})
        assert refused.status_code == 400, (folder, name)
    assert client.get("/api/folder", params={"path": str(tmp_path / "missing")}).status_code == 400
    (tmp_path / "secret.txt").write_text("the key")
    (linked / "ok.txt").symlink_to(tmp_path / "secret.txt")  # a caption file that leads out is not read
    assert "the key" not in client.get("/api/folder", params={"path": str(linked)}).text


def test_a_job_from_uploads_keeps_its_photos_and_captions(client, tmp_path):
    form = {**quick_form(), "photos_folder": "", "captions": {"a.png": "a photo of sks star on red"}}
    files = [("photos", ("a.png", png_bytes(), "image/png")), ("photos", ("../b.png", png_bytes(), "image/png"))]
    job_id = create(client, form, files).json()["id"]
    photos = tmp_path / "jobs" / job_id / "photos"
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a.txt", "b.png"]  # b's folder part dropped
    assert (photos / "a.txt").read_text().strip() == "a photo of sks star on red"
    assert oct((photos / "a.png").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["state"] == "waiting" and job["photos"] == ["photos/a.png", "photos/b.png"]
    assert client.get(f"/api/jobs/{job_id}/files/photos/a.png").content == png_bytes()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("name, content, expected", [
    ("a.png", b"not a png at all", "not a readable image"),
    ("a.png", png_bytes()[:60], "not a readable image"),  # truncated: the trainer's full decode fails
    ("a.exe", png_bytes(), "not an image file"),
    ("a.png", b"\0" * (MAX_UPLOAD_BYTES + 1), "larger than"),
], ids=["garbage", "truncated", "not-an-image-name", "too-large"])
def test_bad_uploads_are_refused_and_leave_nothing(client, tmp_path, name, content, expected):
    refused = create(client, {**quick_form(), "photos_folder": ""}, [("photos", (name, content, "image/png"))])
    assert refused.status_code == 400 and expected in refused.json()["errors"]["photos"]
    assert not [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()]


def test_two_uploads_of_one_name_are_refused_not_one_lost(client, tmp_path):
    for second in ("../a.png", "a.jpg"):  # the same file once its folder is dropped; the same caption file
        files = [("photos", ("a.png", png_bytes(), "image/png")), ("photos", (second, png_bytes(), "image/png"))]
        refused = create(client, {**quick_form(), "photos_folder": ""}, files)
        assert refused.status_code == 400 and "two photos named a" in refused.json()["errors"]["photos"]
    assert not [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()]


def test_too_many_or_too_much_upload_is_refused_at_the_photos_field(client, tmp_path, monkeypatch):
    from dreambooth_moslora.ui import app as ui_app

    files = [("photos", (f"{i}.png", png_bytes(), "image/png")) for i in range(3)]
    monkeypatch.setattr(ui_app, "MAX_PHOTOS", 2)
    too_many = create(client, {**quick_form(), "photos_folder": ""}, files)
    assert too_many.status_code == 400 and "at most 2 photos" in too_many.json()["errors"]["photos"]
    monkeypatch.setattr(ui_app, "MAX_PHOTOS", 200)
    monkeypatch.setattr(ui_app, "MAX_REQUEST_BYTES", 2**20)
    files = [("photos", (f"{i}.png", png_bytes((512, 512)) + b"\0" * 2**19, "image/png")) for i in range(3)]
    too_much = create(client, {**quick_form(), "photos_folder": ""}, files)
    assert too_much.status_code == 400 and "larger than 1 MiB in all" in too_much.json()["errors"]["photos"]
    assert not [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()]


def test_a_job_train_would_refuse_is_refused_at_its_field(client, tmp_path):
    refused = create(client, quick_form(resolution="31"))
    assert refused.status_code == 400
    assert refused.json()["errors"] == {"resolution": "--resolution must be a positive multiple of 8, got 31"}
    no_photos = create(client, {**quick_form(), "photos_folder": str(tmp_path / "missing")})
    assert "folder not found" in no_photos.json()["errors"]["photos"]
    assert not [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()]  # no half job, no staging folder left
    assert client.get("/api/jobs").json() == {"queue": [], "jobs": []}


def test_the_queue_reorders_cancels_and_resumes_waiting_jobs(client):
    ids = [create(client, quick_form()).json()["id"] for _ in range(3)]
    assert client.get("/api/jobs").json()["queue"] == ids
    assert client.post(f"/api/jobs/{ids[2]}/move", json={"position": 0}).json()["queue"] == [ids[2], ids[0], ids[1]]
    assert client.post(f"/api/jobs/{ids[0]}/cancel").json()["state"] == "cancelled"
    assert client.get("/api/jobs").json()["queue"] == [ids[2], ids[1]]
    assert client.post(f"/api/jobs/{ids[0]}/cancel").status_code == 400  # neither waiting nor running
    assert client.post(f"/api/jobs/{ids[0]}/move", json={"position": 0}).status_code == 400
    assert client.post(f"/api/jobs/{ids[0]}/resume").json()["state"] == "waiting"
    assert client.post(f"/api/jobs/{ids[1]}/resume").status_code == 400  # already waiting
    assert client.get("/api/jobs").json()["queue"] == [ids[2], ids[1], ids[0]]
    assert client.get(f"/jobs/{ids[0]}").status_code == 200


def test_a_job_is_deleted_through_the_api(client):
    job_id = create(client, quick_form()).json()["id"]
    assert client.delete(f"/api/jobs/{job_id}").json() == {"deleted": job_id}
    assert client.get(f"/api/jobs/{job_id}").status_code == 404
    assert client.get("/api/jobs").json() == {"queue": [], "jobs": []}
    assert client.delete(f"/api/jobs/{job_id}").status_code == 404


def test_unknown_jobs_are_404(client):
    for url in ["/api/jobs/nope", "/api/jobs/..", "/jobs/nope", "/api/jobs/nope/files/job.json"]:
        assert client.get(url).status_code == 404, url
    assert client.post("/api/jobs/nope/cancel").status_code == 404


def test_a_bug_is_not_reported_as_a_missing_job(tmp_path):
    app = create_app(tmp_path / "jobs", schedule=False)
    job_id = app.state.store.create("a job", lambda photos: photos.mkdir(), lambda photos, output: [], lambda argv: None)
    job_file = tmp_path / "jobs" / job_id / "job.json"
    job_file.write_text(json.dumps({k: v for k, v in json.loads(job_file.read_text()).items() if k != "argv"}))
    client = TestClient(app, base_url=LOCAL, raise_server_exceptions=False)
    broken = client.post(f"/api/jobs/{job_id}/generate", json={"checkpoint": "final", "prompts": ["x"]})
    assert broken.status_code == 500  # a KeyError inside ('argv'), not "no job 'argv'"


def test_job_files_are_served_only_from_inside_the_job(client, tmp_path):
    job_id = create(client, quick_form()).json()["id"]
    folder = tmp_path / "jobs" / job_id
    (tmp_path / "secret.txt").write_text("secret")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert client.get(f"/api/jobs/{job_id}/files/job.json").status_code == 200
    for path in ["../queue.json", "photos/../../queue.json", "%2e%2e/queue.json", "link.txt", "/etc/passwd",
                 "photos", "missing.png"]:
        response = client.get(f"/api/jobs/{job_id}/files/{path}")
        assert response.status_code in (400, 404) and "secret" not in response.text, path


def test_a_finished_job_reports_its_run_and_its_adapters(finished_job):
    jobs, job_id = finished_job
    client = client_of(jobs)
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["state"] == "finished" and job["message"].startswith("trained 2 steps")
    assert job["progress"]["step"] == 2 and job["progress"]["total"] == 2
    assert [step for step, _ in job["progress"]["losses"]] == [1, 2]
    assert job["checkpoints"] == ["final", "checkpoint-1", "checkpoint-2"]
    assert client.get("/api/jobs").json()["jobs"][0]["state"] == "finished"


@pytest.mark.parametrize("checkpoint", ["final", "checkpoint-1"])
@pytest.mark.parametrize("file_format, prefix", [("kohya", "lora_unet_"), ("diffusers", "unet."),
                                                 ("native", "unet.")])
def test_every_adapter_downloads_in_every_format(finished_job, checkpoint, file_format, prefix, tmp_path):
    jobs, job_id = finished_job
    response = client_of(jobs).get(f"/api/jobs/{job_id}/download/{checkpoint}/{file_format}")
    assert response.status_code == 200
    (tmp_path / "file.safetensors").write_bytes(response.content)
    with safe_open(tmp_path / "file.safetensors", "pt") as loaded:
        assert any(key.startswith(prefix) for key in loaded.keys())
    if checkpoint != "final" and file_format != "native":  # exported on request, beside the job's output
        assert (jobs / job_id / "exports" / checkpoint).is_dir()


def test_downloads_and_generation_refuse_what_the_job_does_not_have(finished_job):
    jobs, job_id = finished_job
    client = client_of(jobs)
    for url in [f"/api/jobs/{job_id}/download/best/kohya", f"/api/jobs/{job_id}/download/final/ckpt",
                f"/api/jobs/{job_id}/download/..%2F..%2Fx/native", f"/api/jobs/{job_id}/download/checkpoint-9/native"]:
        assert client.get(url).status_code in (400, 404), url
    no_prompt = client.post(f"/api/jobs/{job_id}/generate", json={"checkpoint": "final", "prompts": [" "]})
    assert no_prompt.status_code == 400 and "prompt" in no_prompt.json()["error"]
    assert client.post(f"/api/jobs/{job_id}/generate", json={"checkpoint": "best", "prompts": ["x"]}).status_code == 400
    assert not (jobs / job_id / "generated").exists() or not any((jobs / job_id / "generated").iterdir())


def test_a_token_is_needed_when_one_is_set(tmp_path):
    client = client_of(tmp_path / "jobs", token="s3cret")
    assert client.get("/api/jobs").status_code == 403
    assert client.get("/api/jobs", headers={"X-Token": "wrong"}).status_code == 403
    assert client.get("/api/jobs", params={"token": "s3crét"}).status_code == 403  # not a 500
    assert client.get("/api/jobs", headers={"X-Token": "s3cret"}).status_code == 200
    first = client.get("/", params={"token": "s3cret"})  # the printed URL sets a cookie for the page's requests
    assert first.status_code == 200 and client.get("/api/jobs").status_code == 200
    assert 'name="ui-token" content="s3cret"' in first.text  # for the page's script to send as X-Token


def test_a_change_needs_the_token_in_the_header_a_cookie_is_not_enough(tmp_path):
    """Cookies are shared by every port of a host: a page on 127.0.0.1:7999 sends the UI's cookie too."""
    client = client_of(tmp_path / "jobs", token="s3cret")
    client.get("/", params={"token": "s3cret"})  # the cookie is set
    refused = create(client, quick_form())
    assert refused.status_code == 403 and "X-Token header" in refused.json()["error"]
    assert client.post("/api/check", json=first_run_values()).status_code == 403
    assert client.post("/api/jobs/x/cancel", params={"token": "s3cret"}).status_code == 403  # nor the URL's
    assert client.post("/api/check", json=first_run_values(), headers={"X-Token": "s3cret"}).status_code == 200
    assert client.get("/api/jobs").json()["jobs"] == []


@pytest.mark.parametrize("headers", [
    {"Origin": "http://127.0.0.1:7999"},  # another port of this host
    {"Origin": "http://evil.example"},
    {"Origin": "null"},  # a sandboxed frame, a data: URL, a file
    {"Sec-Fetch-Site": "same-site"},  # another port, where the browser sends no Origin
    {"Sec-Fetch-Site": "cross-site"},
], ids=["other-port", "other-site", "null", "same-site", "cross-site"])
def test_another_page_can_change_nothing_even_with_the_token(tmp_path, headers):
    client = client_of(tmp_path / "jobs", token="s3cret")
    refused = client.post("/api/jobs", data={"form": json.dumps(quick_form())}, headers={"X-Token": "s3cret", **headers})
    assert refused.status_code == 403, refused.text
    assert client.get("/api/jobs", headers={"X-Token": "s3cret"}).json()["jobs"] == []
    own = client.post("/api/check", json=first_run_values(),
                      headers={"X-Token": "s3cret", "Origin": LOCAL, "Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 200


def test_another_page_may_link_to_the_ui_but_not_load_its_images_or_frame_it(tmp_path):
    client = client_of(tmp_path / "jobs", token="s3cret")
    client.get("/", params={"token": "s3cret"})
    image = {"path": str(SUBJECT), "name": "01.png"}
    assert client.get("/api/folder/image", params=image).status_code == 200
    embedded = client.get("/api/folder/image", params=image,
                          headers={"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"})
    assert embedded.status_code == 403  # an <img> of a page on another port: not even its size leaks
    framed = client.get("/", headers={"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate",
                                      "Sec-Fetch-Dest": "iframe"})
    assert framed.status_code == 403
    linked = client.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                                      "Sec-Fetch-Dest": "document"})
    assert linked.status_code == 200 and linked.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in linked.headers["Content-Security-Policy"]


def test_only_the_servers_own_host_is_answered_token_or_not(tmp_path):
    """DNS rebinding: evil.example made to resolve to 127.0.0.1 arrives with Host: evil.example."""
    for token, headers in [(None, {}), ("s3cret", {"X-Token": "s3cret"})]:
        rebound = TestClient(create_app(tmp_path, token=token, schedule=False), base_url="http://evil.example:7860")
        refused = rebound.get("/api/jobs", headers=headers)
        assert refused.status_code == 403 and "refused Host 'evil.example'" in refused.json()["error"]
        for local in ("http://127.0.0.1:7860", "http://localhost:7860", "http://[::1]:7860"):
            assert TestClient(create_app(tmp_path, token=token, schedule=False), base_url=local).get(
                "/api/jobs", headers=headers).status_code == 200, local
    everywhere = create_app(tmp_path, token="s3cret", schedule=False, host="0.0.0.0")
    assert TestClient(everywhere, base_url="http://10.0.0.5").get("/api/jobs", headers={"X-Token": "s3cret"}).is_success
    assert TestClient(everywhere, base_url="http://evil.example").get(
        "/api/jobs", headers={"X-Token": "s3cret"}).status_code == 403  # a name can be rebound, an address cannot
    one = create_app(tmp_path, token="s3cret", schedule=False, host="192.168.1.5")
    assert TestClient(one, base_url="http://192.168.1.5").get("/api/jobs", headers={"X-Token": "s3cret"}).is_success
    assert TestClient(one, base_url="http://10.0.0.5").get("/api/jobs", headers={"X-Token": "s3cret"}).status_code == 403


def test_a_second_ui_on_the_same_jobs_folder_is_refused(tmp_path):
    with jobs_folder(tmp_path / "jobs"):
        with pytest.raises(UserInputError, match="in use by another UI"):
            with jobs_folder(tmp_path / "jobs"):
                pass
    with jobs_folder(tmp_path / "jobs"):  # released when the first UI stops
        pass
    with jobs_folder(tmp_path / "jobs (old)"):  # a parenthesis in the path does not garble the holder
        with pytest.raises(UserInputError, match=r"jobs \(old\) is in use by another UI: PID \d+ on "):
            with jobs_folder(tmp_path / "jobs (old)"):
                pass
    with pytest.raises(UserInputError, match="^port in use$"):  # the UI's own error is not reworded
        with jobs_folder(tmp_path / "jobs"):
            raise UserInputError("port in use")


def test_the_queue_outlives_a_failed_tick(monkeypatch):
    import threading

    from dreambooth_moslora.ui import app as ui_app

    ticks = []

    class Store:
        def advance(self):
            ticks.append(1)
            if len(ticks) == 1:
                raise OSError("a job folder vanished mid-tick")

    monkeypatch.setattr(ui_app, "TICK_SECONDS", 0.01)
    stop = threading.Event()
    thread = threading.Thread(target=ui_app._scheduler, args=(Store(), stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while len(ticks) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=5)
    assert len(ticks) >= 3  # the thread did not end with the first tick's error


def test_uploads_are_decoded_off_the_event_loop(client, monkeypatch):
    import asyncio

    from dreambooth_moslora.ui import photos

    real, seen = photos.load_rgb, []

    def decode(data):
        try:
            asyncio.get_running_loop()
            seen.append("event loop")  # would stall every other request while it decodes
        except RuntimeError:
            seen.append("worker")
        return real(data)

    monkeypatch.setattr(photos, "load_rgb", decode)
    create(client, {**quick_form(), "photos_folder": ""}, [("photos", ("a.png", png_bytes(), "image/png"))])
    assert seen == ["worker"]


def test_a_link_in_a_photo_folder_is_neither_listed_copied_nor_served(client, tmp_path):
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "secret.png").write_bytes(png_bytes(colour=(1, 2, 3)))  # outside, even a real image is not taken
    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted(SUBJECT.glob("0[0-2].png")):
        shutil.copy(source, photos)
    (photos / "leak.png").symlink_to(tmp_path / "passwd")
    (photos / "out.png").symlink_to(tmp_path / "secret.png")
    listed = client.get("/api/folder", params={"path": str(photos)}).json()
    assert [p["name"] for p in listed["photos"]] == ["00.png", "01.png", "02.png"]
    job_id = create(client, {**quick_form(), "photos_folder": str(photos)}).json()["id"]
    job_photos = tmp_path / "jobs" / job_id / "photos"
    assert sorted(p.name for p in job_photos.iterdir()) == ["00.png", "01.png", "02.png"]
    for name in ("leak.png", "out.png"):
        served = client.get(f"/api/jobs/{job_id}/files/photos/{name}")
        assert served.status_code in (400, 404) and "root:" not in served.text


def test_a_chunked_upload_is_stopped_at_the_limit_as_it_streams(tmp_path, monkeypatch):
    """No Content-Length to refuse up front: the bytes are counted as they arrive."""
    import asyncio

    from dreambooth_moslora.ui import app as ui_app

    monkeypatch.setattr(ui_app, "MAX_REQUEST_BYTES", 2**20)
    boundary = b"limit-test-boundary"
    head = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="photos"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    chunk, chunks = b"\0" * 2**16, 64  # 4 MiB in all
    sent = []

    async def receive():
        if not sent:
            body = head
        elif len(sent) <= chunks:
            body = chunk
        else:
            sent.append(b"\r\n--" + boundary + b"--\r\n")
            return {"type": "http.request", "body": sent[-1], "more_body": False}
        sent.append(body)
        return {"type": "http.request", "body": body, "more_body": True}

    replies = []

    async def send(message):
        replies.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/jobs", "raw_path": b"/api/jobs", "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"127.0.0.1"), (b"transfer-encoding", b"chunked"),
                         (b"content-type", b"multipart/form-data; boundary=" + boundary)]}
    asyncio.run(create_app(tmp_path / "jobs", schedule=False)(scope, receive, send))
    [start] = [m for m in replies if m["type"] == "http.response.start"]
    body = json.loads(b"".join(m.get("body", b"") for m in replies if m["type"] == "http.response.body"))
    assert start["status"] == 400 and body["errors"]["photos"] == "the upload is larger than 1 MiB in all"
    assert sum(map(len, sent)) < 2**20 + 2 * len(chunk)  # stopped at the limit, not after all 4 MiB
    assert not [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()]


@pytest.mark.parametrize("url, body, field", [
    ("/api/jobs/{job}/generate", {"checkpoint": "final", "prompts": ["x"], "seed": "abc"}, "seed"),
    ("/api/jobs/{job}/generate", {"checkpoint": "final", "prompts": ["x"], "count": None}, "count"),
    ("/api/jobs/{job}/generate", {"checkpoint": "final", "prompts": [1, 2]}, "prompts.0"),
    ("/api/jobs/{job}/generate", {"checkpoint": "final", "prompts": ["x"], "steps": 0}, "steps"),
    ("/api/jobs/{job}/move", {"position": "abc"}, "position"),
    ("/api/check", {"advanced": ["a"]}, "advanced"),
    ("/api/plan", {"advanced": ["a"]}, "advanced"),
], ids=["seed", "count", "prompts", "steps", "position", "check", "plan"])
def test_malformed_values_are_a_400_naming_their_field(tmp_path, url, body, field):
    client = TestClient(create_app(tmp_path / "jobs", schedule=False), base_url=LOCAL, raise_server_exceptions=False)
    job_id = create(client, quick_form()).json()["id"]
    response = client.post(url.format(job=job_id), json=body)
    assert response.status_code == 400 and response.json()["error"].startswith(f"{field}: "), response.text


def test_a_malformed_form_of_a_new_job_is_a_400_at_the_form_field(client):
    refused = create(client, {**quick_form(), "advanced": ["a"]})
    assert refused.status_code == 400 and refused.json()["errors"]["form"].startswith("the form is malformed: advanced")
    assert "Invalid JSON" in client.post("/api/jobs", data={"form": "{"}).json()["errors"]["form"]


@pytest.mark.parametrize("option, value, message", [
    ("learning_rate", "-0.001", "--learning_rate must be a positive number, got -0.001"),
    ("learning_rate", "-1", "--learning_rate must be a positive number, got -1.0"),
    ("learning_rate", "-1e-3", "--learning_rate must be a positive number, got -0.001"),  # not "expected one argument"
    ("text_encoder_lr", "0", "--text_encoder_lr must be a positive number, got 0.0"),
    ("lr_warmup_steps", "-5", "--lr_warmup_steps cannot be negative, got -5"),
    ("max_train_steps", "-5", "--max_train_steps must be at least 1, got -5"),
])
def test_a_number_that_makes_no_sense_is_refused_at_its_field_and_nothing_queued(client, option, value, message):
    form = quick_form(**{option: value})
    assert client.post("/api/check", json=form).json()["errors"] == {option: message}
    refused = create(client, form)
    assert refused.status_code == 400 and refused.json()["errors"] == {option: message}
    assert client.get("/api/jobs").json()["jobs"] == []


def test_uploaded_names_keep_their_spaces_parentheses_and_captions(client, tmp_path):
    name = "my photo (1).png"
    form = {**quick_form(), "photos_folder": "", "captions": {name: "a photo of sks star, smiling"}}
    job_id = create(client, form, [("photos", (name, png_bytes(), "image/png"))]).json()["id"]
    photos = tmp_path / "jobs" / job_id / "photos"
    assert sorted(p.name for p in photos.iterdir()) == ["my photo (1).png", "my photo (1).txt"]
    assert (photos / "my photo (1).txt").read_text().strip() == "a photo of sks star, smiling"


def test_a_photo_train_cannot_read_is_named_at_the_field_and_left_out_of_the_job(client, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(SUBJECT, photos)
    (photos / "fake.png").write_bytes(b"not a png at all")
    listed = client.get("/api/folder", params={"path": str(photos)}).json()
    assert "fake.png" not in [p["name"] for p in listed["photos"]] and len(listed["photos"]) == 5
    assert listed["skipped"] == ["fake.png is not a readable image (not a format PIL recognizes): left out, as "
                                 "train leaves it out"]
    job_id = create(client, {**quick_form(), "photos_folder": str(photos)}).json()["id"]
    kept = sorted(p.name for p in (tmp_path / "jobs" / job_id / "photos").glob("*.png"))
    assert kept == ["00.png", "01.png", "02.png", "03.png", "04.png"]  # measured validation reads every one


def test_photo_errors_name_the_users_folder_and_file_never_internals(client, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "a.png").write_bytes(b"not a png at all")
    refused = create(client, {**quick_form(), "photos_folder": str(fake)})
    assert refused.json()["errors"]["photos"] == f"no readable images in {fake}"  # not the job's .new-…/photos
    upload = create(client, {**quick_form(), "photos_folder": ""}, [("photos", ("b.png", b"junk", "image/png"))])
    assert upload.json()["errors"]["photos"] == "b.png is not a readable image (not a format PIL recognizes)"


def test_the_icon_a_waiting_jobs_log_and_the_time_each_job_was_made(client):
    assert client.get("/favicon.ico").status_code == 200
    first, second = (create(client, quick_form()).json()["id"] for _ in range(2))  # one name, two jobs
    log = client.get(f"/api/jobs/{first}/files/train.log")
    assert log.status_code == 200 and "waiting for its turn in the queue" in log.text
    listed = client.get("/api/jobs").json()["jobs"]
    assert {job["name"] for job in listed} == {"sks star"} and {job["id"] for job in listed} == {first, second}
    assert all(time.time() - 60 < job["created"] <= time.time() for job in listed)


def test_a_prompt_that_starts_with_dashes_reaches_generate_as_a_prompt(client, tmp_path, monkeypatch):
    from dreambooth_moslora.ui import outputs
    from dreambooth_moslora.verbs.cli import build_parser as cli_parser

    job_id = create(client, quick_form()).json()["id"]
    output = tmp_path / "jobs" / job_id / "output"
    output.mkdir()
    (output / "moslora.safetensors").write_bytes(b"a stand-in")
    started = []

    class Started:
        pid = None

    monkeypatch.setattr(outputs.subprocess, "Popen", lambda command, **_: started.append(command) or Started())
    prompts = ["--ar 16:9 a photo of sks star", "-a sks star"]
    assert client.post(f"/api/jobs/{job_id}/generate", json={"checkpoint": "final", "prompts": prompts}).is_success
    [command] = started
    assert cli_parser().parse_args(command[command.index("generate"):]).prompt == prompts


def test_the_token_is_kept_for_its_jobs_folder_readable_by_its_owner_only(tmp_path):
    from dreambooth_moslora.ui.server import TOKEN_FILE, access_token

    assert access_token("mine", tmp_path) == "mine" and not (tmp_path / TOKEN_FILE).exists()
    first = access_token(None, tmp_path)
    assert len(first) >= 24 and access_token(None, tmp_path) == first  # a restarted UI answers the open tabs
    assert (tmp_path / TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    (tmp_path / TOKEN_FILE).chmod(0o644)  # readable by other accounts: no longer a secret
    replaced = access_token(None, tmp_path)
    assert replaced != first and (tmp_path / TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    (tmp_path / "other").mkdir()
    assert access_token(None, tmp_path / "other") not in (first, replaced)


def test_a_busy_port_is_one_error_before_any_url(tmp_path, capsys):
    import socket

    from dreambooth_moslora.ui.server import serve

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(UserInputError, match=f"cannot listen on 127.0.0.1:{port} .*choose another --port"):
            serve(tmp_path / "jobs", port=port)
    assert "token=" not in capsys.readouterr().out


def test_serving_beyond_this_machine_is_warned_of(tmp_path, capsys, monkeypatch):
    import uvicorn

    from dreambooth_moslora.ui.server import exposure_warning, serve

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host) is None, host
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: None)
    serve(tmp_path / "jobs", host="0.0.0.0", port=0)
    shown = capsys.readouterr()
    assert shown.err.startswith("warning: --host 0.0.0.0 serves this UI over plain HTTP")
    assert "open http://0.0.0.0:" in shown.out
