"""The web UI: a local app over the `train` and `generate` commands, each job its own process (docs/ui.md).

The library API: `app.create_app(jobs_dir)` (the FastAPI app) and `server.serve(jobs_dir, host, port, token)`.
"""
