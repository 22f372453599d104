"""Entry point for uvicorn workers: each worker process builds its app from the environment."""

from __future__ import annotations

import json
import os

from starlette.applications import Starlette

from smifdb.api import create_app

DSN_VAR = "SMIFDB_API_DSN"
PROJECT_VAR = "SMIFDB_API_PROJECT"
# allowed_hosts, bind_host, public_url, metrics_token (JSON): the environment, not argv, so
# the metrics token is not shown by ps.
SECURITY_VAR = "SMIFDB_API_SECURITY"


def app_from_env() -> Starlette:
    return create_app(
        os.environ[DSN_VAR],
        project_dir=os.environ.get(PROJECT_VAR) or None,
        **json.loads(os.environ.get(SECURITY_VAR) or "{}"),
    )
