"""The web app: pages, and a JSON API over the job store, the form and the job folders (docs/ui.md).

Every request passes `guard`: the token when one is set (`dreambooth-moslora ui` always sets one), and otherwise a
Host of this machine and no foreign Origin, so a web page elsewhere cannot drive a local UI. Files are served only from inside
a job folder or, for the form's previews, the images of a folder the user named (ui/paths.py).
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import shutil
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlparse

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from PIL import UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..adapter.errors import UserInputError
from ..adapter.files import write_atomically, write_text_atomically
from ..trainer.data import IMAGE_EXTENSIONS, image_files, load_rgb
from ..trainer.memory_plan import PRESET_OPTIONS
from . import form as forms
from .jobs import LOG_FILE, JobStore, UnknownJob
from .outputs import adapter_file, generations, start_generation
from .paths import folder_image, inside, named_folder
from .progress import job_report

logger = logging.getLogger(__name__)
HERE = Path(__file__).parent
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PHOTOS, MAX_REQUEST_BYTES = 200, 2**30
"""Every upload is held in memory until the job is built: its count and its whole size are bounded too."""
MAX_CAPTION_CHARS = 2**16
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
TICK_SECONDS = 0.5


class FormErrors(UserInputError):
    """Errors by field, shown beside each field."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(errors.values()))
        self.errors = errors


def create_app(jobs_dir, token: str | None = None, schedule: bool = True) -> FastAPI:
    """The app over one jobs folder. schedule: run the queue (start the next waiting job whenever none runs)."""
    store = JobStore(jobs_dir)

    @asynccontextmanager
    async def lifespan(app):
        stop = threading.Event()
        if schedule:
            threading.Thread(target=_scheduler, args=(store, stop), daemon=True, name="ui-queue").start()
        yield
        stop.set()

    app = FastAPI(title="dreambooth-moslora", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.token = store, token
    templates = Jinja2Templates(directory=HERE / "templates")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        refusal = _refusal(request, token)
        if refusal:
            return JSONResponse({"error": refusal}, status_code=403)
        response = await call_next(request)
        if token and request.query_params.get("token") == token:
            response.set_cookie("token", token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(FormErrors)
    async def form_errors(request, error: FormErrors):
        return JSONResponse({"errors": error.errors}, status_code=400)

    @app.exception_handler(UserInputError)
    async def user_error(request, error: UserInputError):
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(UnknownJob)
    async def unknown_job(request, error: UnknownJob):
        return JSONResponse({"error": f"no job {error.args[0]!r}"}, status_code=404)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/", response_class=HTMLResponse)
    def new_job_page(request: Request):
        setup = {"options": [o.__dict__ for o in forms.train_options()], "values": forms.first_run_values(),
                 "presets": list(PRESET_OPTIONS)}
        # "</" escaped: no string in it can close the <script> element that carries it
        return templates.TemplateResponse(request, "index.html", {"setup": json.dumps(setup).replace("</", "<\\/")})

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: str):
        return templates.TemplateResponse(request, "job.html", {"job": store.read(job_id)})

    @app.get("/api/folder")
    def folder_photos(path: str):
        """The images `train` would read from a folder the user named, with their caption files."""
        return {"folder": str(named_folder(path)), "photos": [
            {"name": p.name, "caption": _caption(p)} for p in image_files(named_folder(path))]}

    @app.get("/api/folder/image")
    def folder_photo(path: str, name: str):
        return FileResponse(folder_image(path, name))

    @app.post("/api/check")
    def check_form(body: dict):
        """The command the form makes, and the CLI's errors for it, before anything starts."""
        argv = _argv(body)
        return {"command": forms.shell_line(argv), "errors": forms.check(argv)}

    @app.post("/api/plan")
    def plan(body: dict):
        return {"presets": forms.preset_table(_argv(body))}

    @app.post("/api/jobs")
    async def create_job(request: Request):
        """A job from the form (field `form`, JSON) and its photos: uploaded files (`photos`) or the named
        folder's images, each with its caption (`form.captions`). Checked as `train` checks it, then queued."""
        if int(request.headers.get("content-length") or 0) > MAX_REQUEST_BYTES:  # before it is spooled to disk
            raise FormErrors({"photos": f"the upload is larger than {MAX_REQUEST_BYTES // 2**20} MiB in all"})
        try:
            data = await request.form(max_files=MAX_PHOTOS)
        except HTTPException as error:  # too many files or fields: at the photos field, not as {"detail"}
            raise FormErrors({"photos": f"{error.detail} (at most {MAX_PHOTOS} photos)"}) from None
        try:
            body = json.loads(str(data.get("form") or "{}"))
        except json.JSONDecodeError as error:
            raise FormErrors({"form": f"the form field is not JSON ({error.msg})"}) from None
        uploads = [f for f in data.getlist("photos") if isinstance(f, UploadFile) and f.filename]
        contents = [(_upload_name(f.filename), await _read_limited(f)) for f in uploads]
        fill = _uploaded(contents, body) if contents else _copied(body)

        def check(argv):
            errors = forms.check(argv)
            if errors:
                raise FormErrors(errors)

        name = body.get("name") or f"{body.get('trigger', '')} {body.get('class_word', '')}".strip()
        job_id = await run_in_threadpool(store.create, name, fill,
                                         lambda photos, output: forms.command_line(body, photos, output), check)
        return {"id": job_id}

    @app.get("/api/jobs")
    def list_jobs():
        return {"queue": store.queue(), "jobs": [{"id": i, "name": store.read(i)["name"], **store.state(i)}
                                                 for i in store.ids()]}

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str):
        """Everything the job page shows, read from the job's folder (polled by the page)."""
        folder = store.folder(job_id)
        return {"job": store.read(job_id), **store.state(job_id), **job_report(folder),
                "photos": [f"photos/{p.name}" for p in image_files(folder / "photos")],
                "generations": generations(folder)}

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        store.cancel(job_id)
        return store.state(job_id)

    @app.post("/api/jobs/{job_id}/resume")
    def resume(job_id: str):
        store.resume(job_id)
        return store.state(job_id)

    @app.delete("/api/jobs/{job_id}")
    def delete(job_id: str):
        store.delete(job_id)
        return {"deleted": job_id}

    @app.post("/api/jobs/{job_id}/move")
    def move(job_id: str, body: dict):
        store.move(job_id, int(body.get("position", 0)))
        return {"queue": store.queue()}

    @app.get("/api/jobs/{job_id}/files/{path:path}")
    def job_file(job_id: str, path: str):
        """A file of the job folder (images, logs, reports): only from inside it."""
        found = inside(store.folder(job_id), path)
        if not found.is_file():
            raise UserInputError(f"no file {path!r} in job {job_id}")
        return FileResponse(found, media_type="text/plain" if found.name == LOG_FILE else None)

    @app.get("/api/jobs/{job_id}/download/{checkpoint}/{file_format}")
    def download(job_id: str, checkpoint: str, file_format: str):
        path = adapter_file(store.folder(job_id), checkpoint, file_format)
        return FileResponse(path, filename=f"{store.read(job_id)['name'] or job_id}-{checkpoint}-{path.name}"
                            .replace(" ", "-"))

    @app.post("/api/jobs/{job_id}/generate")
    def generate(job_id: str, body: dict):
        number = start_generation(store.folder(job_id), store.read(job_id), str(body.get("checkpoint")),
                                  list(body.get("prompts") or []), int(body.get("seed", 0)),
                                  int(body.get("count", 1)), float(body.get("guidance", 5.0)),
                                  int(body.get("steps", 25)))
        return {"number": number}

    return app


def _scheduler(store: JobStore, stop: threading.Event):
    """Survives a failed tick: one bad job must not stop every later one from starting."""
    while not stop.wait(TICK_SECONDS):
        try:
            store.advance()
        except Exception:
            logger.exception("ui: the queue's tick failed; trying again")


def _refusal(request: Request, token: str | None) -> str | None:
    if token:
        given = (request.headers.get("x-token") or request.query_params.get("token")
                 or request.cookies.get("token") or "")
        # as bytes: compare_digest refuses str with non-ASCII characters (a 500 for any ?token=é)
        return (None if secrets.compare_digest(given.encode(), token.encode())
                else "a token is needed: open the URL the UI printed")
    host = (request.url.hostname or "").strip("[]")
    origin = request.headers.get("origin")
    if host not in LOCAL_HOSTS:
        return f"refused Host {host!r}: this UI answers 127.0.0.1 only (start it with --host and a token)"
    if origin and (urlparse(origin).hostname or "") not in LOCAL_HOSTS:
        return f"refused a request from {origin}"
    return None


def _argv(body: dict) -> list[str]:
    return forms.command_line(body, str(body.get("photos_folder") or ""))


def _caption(image: Path) -> str:
    """Its caption file, when one lies in its own folder: a link out (a.txt -> ~/.ssh/id_rsa, made by anyone who can
    reach this port) is not read, and a caption's first 64 KiB are plenty."""
    try:
        text = inside(image.parent, image.with_suffix(".txt").name)
    except UserInputError:
        return ""
    if not text.is_file():
        return ""
    with open(text, encoding="utf-8", errors="replace") as file:
        return file.read(MAX_CAPTION_CHARS).strip()


def _upload_name(filename: str) -> str:
    """A bare, plain file name with an image extension: no folders, nothing hidden."""
    name = re.sub(r"[^\w.-]", "_", Path(filename.replace("\\", "/")).name).lstrip(".")
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        raise FormErrors({"photos": f"{filename}: not an image file (use {', '.join(IMAGE_EXTENSIONS)})"})
    return name


async def _read_limited(upload: UploadFile) -> bytes:
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise FormErrors({"photos": f"{upload.filename}: larger than {MAX_UPLOAD_BYTES // 2**20} MiB"})
    try:
        # the trainer's own decode (truncated or corrupt files fail here), in a worker: a 20 MiB photo's full
        # decode would stall every other request of this async endpoint's event loop
        await run_in_threadpool(load_rgb, io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise FormErrors({"photos": f"{upload.filename}: not a readable image ({error})"}) from None
    return data


def _write_captions(folder: Path, names: list[str], captions: dict, fallback: dict):
    for name in names:
        caption = str(captions.get(name, fallback.get(name, ""))).strip()
        if caption:
            write_text_atomically(folder / Path(name).with_suffix(".txt"), caption + "\n")


def _uploaded(contents: list[tuple[str, bytes]], body: dict):
    stems = [Path(name).stem for name, _ in contents]  # a.png and a.jpg would share a.txt; a second a.png would win
    if len(set(stems)) < len(stems):
        twice = next(s for s in stems if stems.count(s) > 1)
        raise FormErrors({"photos": f"two photos named {twice}: each needs a name of its own (its caption is "
                                    f"{twice}.txt)"})

    def fill(folder: Path):
        folder.mkdir()
        for name, data in contents:
            write_atomically(folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        _write_captions(folder, [name for name, _ in contents], body.get("captions") or {}, {})
    return fill


def _copied(body: dict):
    def fill(folder: Path):
        if not body.get("photos_folder"):
            raise FormErrors({"photos": "choose a folder of photos or upload some"})
        try:
            images = image_files(named_folder(body["photos_folder"]))
        except UserInputError as error:
            raise FormErrors({"photos": str(error)}) from None
        folder.mkdir()
        for image in images:
            write_atomically(folder / image.name, lambda tmp, image=image: shutil.copyfile(image, tmp))
        _write_captions(folder, [i.name for i in images], body.get("captions") or {},
                        {i.name: _caption(i) for i in images})
    return fill
