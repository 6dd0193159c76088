"""HTTP service for stations: ``unidg serve --bundle B`` (docs/service.md).

- ``config``: ``ServeConfig`` and the address rules (who may call without a key).
- ``protocol``: ``params`` JSON and uploads → checked inputs; the JSON error shape; metadata without server paths.
- ``pool``: admission (once the body has arrived), the upload budget and the synthesis worker threads.
- ``metrics``: Prometheus text.
- ``app``: the FastAPI app (the only module importing FastAPI/Starlette); ``server``: uvicorn with connection limits.

The lean runtime imports this package without the ``[serve]`` extra: ``create_app`` and ``serve`` load FastAPI and
uvicorn only when called.
"""

from __future__ import annotations

from typing import Any

from unidg.runtime.serve.config import ServeConfig, api_key_from_env, check_bind_address, is_loopback
from unidg.runtime.serve.protocol import ServiceError, SynthesisParams, jsonable, parse_params

__all__ = [
    "ServeConfig",
    "ServiceError",
    "SynthesisParams",
    "api_key_from_env",
    "check_bind_address",
    "create_app",
    "is_loopback",
    "jsonable",
    "parse_params",
    "serve",
]


def create_app(config: ServeConfig, factory: Any = None) -> Any:
    """The FastAPI app (see unidg.runtime.serve.app.create_app)."""
    # FastAPI and uvicorn (the [serve] extra) load when called: the lean runtime imports this package without them.
    from unidg.runtime.serve.app import create_app as create

    return create(config, factory)


def serve(config: ServeConfig, log_level: str = "info") -> None:
    """Run the service in the foreground (see unidg.runtime.serve.server.serve)."""
    from unidg.runtime.serve.server import serve as run

    run(config, log_level)
