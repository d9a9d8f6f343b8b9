"""The API key that guards the routes a hospital's systems call, not its users (feedback, worklist, admin)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Header
from starlette.exceptions import HTTPException

API_KEY_HEADER = "X-API-Key"


def api_key_check(api_key: str) -> Callable[..., None]:
    """A FastAPI dependency: 401 unless the request's ``X-API-Key`` is ``api_key`` (compared in constant time)."""

    def require_key(key: Annotated[str | None, Header(alias=API_KEY_HEADER)] = None) -> None:
        if key is None or not hmac.compare_digest(key.encode(), api_key.encode()):
            raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header")

    return require_key
