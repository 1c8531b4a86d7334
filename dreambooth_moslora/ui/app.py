"""The web app: pages, and a JSON API over the job store, the form and the job folders (docs/ui.md).

Every request passes the guard (ui/guard.py): this server's own Host, the UI's own page for anything that changes
state, and the token. Files are served only from inside a job folder or, for the form's previews, the images of a
folder the user named (ui/paths.py).
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request as BareRequest

from ..adapter.errors import UserInputError
from ..trainer.data import image_files
from ..trainer.memory_plan import PRESET_OPTIONS
from . import form as forms
from .bodies import Generation, Move, TrainForm, one_line, train_form
from .guard import SECURITY_HEADERS, Guard, cookie_name
from .jobs import LOG_FILE, JobStore, UnknownJob
from .outputs import adapter_file, generations, start_generation
from .paths import folder_image, inside
from .photos import FormErrors, copied, folder_listing, read_upload, uploaded
from .progress import job_report

logger = logging.getLogger(__name__)
HERE = Path(__file__).parent
MAX_PHOTOS, MAX_REQUEST_BYTES = 200, 2**30
"""Every upload is held until the job is built: its count and its whole size are bounded too."""
TICK_SECONDS = 0.5


def create_app(jobs_dir, token: str | None = None, schedule: bool = True, host: str = "127.0.0.1") -> FastAPI:
    """The app over one jobs folder, served at `host`. schedule: run the queue (start the next waiting job whenever
    none runs)."""
    store, guard = JobStore(jobs_dir), Guard(host, token)

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
    async def guarded(request: Request, call_next):
        refusal = guard.refusal(request)
        response = JSONResponse({"error": refusal}, status_code=403) if refusal else await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not refusal and token and request.query_params.get("token") == token:
            # HttpOnly: a page on another port of this host shares the cookie jar, and must not read it
            response.set_cookie(cookie_name(request), token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(FormErrors)
    async def form_errors(request, error: FormErrors):
        return JSONResponse({"errors": error.errors}, status_code=400)

    @app.exception_handler(UserInputError)
    async def user_error(request, error: UserInputError):
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def malformed(request, error: RequestValidationError):
        return JSONResponse({"error": one_line(error.errors())}, status_code=400)

    @app.exception_handler(UnknownJob)
    async def unknown_job(request, error: UnknownJob):
        return JSONResponse({"error": f"no job {error.args[0]!r}"}, status_code=404)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/", response_class=HTMLResponse)
    def new_job_page(request: Request):
        setup = {"options": [o.__dict__ for o in forms.train_options()], "values": forms.first_run_values(),
                 "presets": list(PRESET_OPTIONS)}
        # "</" escaped: no string in it can close the <script> element that carries it
        return templates.TemplateResponse(request, "index.html", {
            "setup": json.dumps(setup).replace("</", "<\\/"), "token": token or ""})

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: str):
        return templates.TemplateResponse(request, "job.html", {"job": store.read(job_id), "token": token or ""})

    @app.get("/favicon.ico")
    def favicon():
        return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml")

    @app.get("/api/folder")
    def folder_photos(path: str):
        """The images `train` would read from a folder the user named, with their caption files, and those it
        would leave out."""
        return folder_listing(path)

    @app.get("/api/folder/image")
    def folder_photo(path: str, name: str):
        return FileResponse(folder_image(path, name))

    @app.post("/api/check")
    def check_form(body: TrainForm):
        """The command the form makes, and the CLI's errors for it, before anything starts."""
        argv = _argv(body.model_dump())
        return {"command": forms.shell_line(argv), "errors": forms.check(argv)}

    @app.post("/api/plan")
    def plan(body: TrainForm):
        return {"presets": forms.preset_table(_argv(body.model_dump()))}

    @app.post("/api/jobs")
    async def create_job(request: Request):
        """A job from the form (field `form`, JSON) and its photos: uploaded files (`photos`) or the named
        folder's images, each with its caption (`form.captions`). Checked as `train` checks it, then queued."""
        try:
            data = await BareRequest(request.scope, _limited(request, MAX_REQUEST_BYTES)).form(max_files=MAX_PHOTOS)
        except HTTPException as error:  # too many files or fields: at the photos field, not as {"detail"}
            raise FormErrors({"photos": f"{error.detail} (at most {MAX_PHOTOS} photos)"}) from None
        body = train_form(str(data.get("form") or "{}"))
        uploads = [f for f in data.getlist("photos") if isinstance(f, UploadFile) and f.filename]
        files = [(f.filename, await read_upload(f)) for f in uploads]
        fill = uploaded(files, body["captions"]) if files else copied(body["photos_folder"], body["captions"])

        def check(argv):
            errors = forms.check(argv)
            if errors:
                raise FormErrors(errors)

        name = body["name"] or f"{body['trigger']} {body['class_word']}".strip()
        job_id = await run_in_threadpool(store.create, name, fill,
                                         lambda photos, output: forms.command_line(body, photos, output), check)
        return {"id": job_id}

    @app.get("/api/jobs")
    def list_jobs():
        return {"queue": store.queue(), "jobs": [{"id": i, "name": store.read(i)["name"],
                                                  "created": store.read(i).get("created"), **store.state(i)}
                                                 for i in store.ids()]}

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str):
        """Everything the job page shows, read from the job's folder (polled by the page)."""
        folder = store.folder(job_id)
        return {"job": store.read(job_id), **store.state(job_id), **job_report(folder, store.read(job_id)),
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
    def move(job_id: str, body: Move):
        store.move(job_id, body.position)
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
    def generate(job_id: str, body: Generation):
        number = start_generation(store.folder(job_id), store.read(job_id), body.checkpoint, body.prompts,
                                  body.seed, body.count, body.guidance, body.steps)
        return {"number": number}

    return app


def _scheduler(store: JobStore, stop: threading.Event):
    """Survives a failed tick: one bad job must not stop every later one from starting."""
    while not stop.wait(TICK_SECONDS):
        try:
            store.advance()
        except Exception:
            logger.exception("ui: the queue's tick failed; trying again")


def _argv(body: dict) -> list[str]:
    return forms.command_line(body, body["photos_folder"])


def _limited(request: Request, limit: int):
    """The request's receive, refusing the body at the photos field once more than `limit` bytes have come: a
    declared length is refused before anything is read, a chunked upload (no length) as it streams."""
    too_large = FormErrors({"photos": f"the upload is larger than {limit // 2**20} MiB in all"})
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise too_large
        return message
    return receive
