"""`dreambooth-moslora ui`: hold the jobs folder, bind the port, print the URL, serve the app with uvicorn.

The jobs folder is held with the trainer's output-folder lock for as long as the UI runs, so a second UI on the
same folder is refused (two schedulers would start two trainings at once). The port is bound before the URL is
printed, so a busy port is one line, not a URL that leads nowhere.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..adapter.errors import UserInputError
from ..trainer.output_lock import output_folder_lock
from .app import create_app
from .guard import is_loopback

TOKEN_FILE = ".ui-token"


@contextmanager
def jobs_folder(jobs_dir):
    """The jobs folder, held for this UI; a folder another UI (or a training) holds is refused. Only the lock's own
    refusal is reworded: an error of the UI that runs inside passes unchanged."""
    with ExitStack() as stack:
        try:
            stack.enter_context(output_folder_lock(jobs_dir))
        except UserInputError as error:
            holder = re.search(r"\((PID [^)]*)\)", str(error))
            raise UserInputError(f"jobs folder {jobs_dir} is in use by another UI"
                                 f"{': ' + holder.group(1) if holder else ''}; open that UI, or choose another "
                                 "--jobs_dir") from None
        yield Path(jobs_dir).resolve()


def access_token(token: str | None, folder: Path) -> str:
    """Always a token (as Jupyter's): every account on the machine can reach a loopback port, and this UI reads the
    user's images and starts trainings. Without --token, the jobs folder's own, generated once and kept in a file
    only its owner can read, so a restarted UI still answers the tabs it left open."""
    if token:
        return token
    path = folder / TOKEN_FILE
    if path.is_file() and not path.is_symlink():
        status = path.stat()
        if status.st_uid == os.getuid() and not status.st_mode & 0o077:
            kept = path.read_text(encoding="ascii", errors="replace").strip()
            if kept:
                return kept
        print(f"warning: {path} could be read or changed by other accounts: made a new token", file=sys.stderr)
    token = secrets.token_urlsafe(24)
    staging = folder / f"{TOKEN_FILE}.{os.getpid()}"
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        os.fchmod(file.fileno(), 0o600)  # a file left over by a killed UI keeps the mode it had
        file.write(token + "\n")
    os.replace(staging, path)
    return token


def exposure_warning(host: str) -> str | None:
    """What serving beyond this machine means, as TensorBoard's --bind_all and Jupyter warn."""
    if is_loopback(host):
        return None
    return (f"warning: --host {host} serves this UI over plain HTTP to every machine that can reach this one: the "
            "token travels unencrypted, and anyone who has it can read your photos and start trainings. Prefer the "
            "default 127.0.0.1 with an SSH tunnel (ssh -L) or a TLS proxy in front of it.")


def bound_socket(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        raise UserInputError(f"cannot listen on {host}:{port} ({error.strerror or error}); is another program "
                             "using it? choose another --port") from None


def serve(jobs_dir, host: str = "127.0.0.1", port: int = 7860, token: str | None = None):
    import uvicorn

    with jobs_folder(jobs_dir) as folder, bound_socket(host, port) as listening:
        token = access_token(token, folder)
        warning = exposure_warning(host)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        shown = f"[{host}]" if ":" in host else host
        print(f"dreambooth-moslora ui: jobs in {folder}\n  open http://{shown}:{listening.getsockname()[1]}/"
              f"?token={token}", flush=True)
        app = create_app(folder, token=token, host=host)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])
