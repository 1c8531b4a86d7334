"""`dreambooth-moslora ui`: hold the jobs folder, print the URL, serve the app with uvicorn.

The jobs folder is held with the trainer's output-folder lock for as long as the UI runs, so a second UI on the
same folder is refused (two schedulers would start two trainings at once).
"""

from __future__ import annotations

import re
import secrets
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..adapter.errors import UserInputError
from ..trainer.output_lock import output_folder_lock
from .app import create_app


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


def access_token(token: str | None) -> str:
    """Always a token, generated when not given (as Jupyter does): every account on the machine can reach a
    loopback port, and this UI reads the user's images and starts trainings."""
    return token or secrets.token_urlsafe(24)


def serve(jobs_dir, host: str = "127.0.0.1", port: int = 7860, token: str | None = None):
    import uvicorn

    token = access_token(token)
    with jobs_folder(jobs_dir) as folder:
        app = create_app(folder, token=token)
        shown = f"[{host}]" if ":" in host else host
        print(f"dreambooth-moslora ui: jobs in {folder}\n  open http://{shown}:{port}/?token={token}", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
