"""Basic auth for the ingress's routes, as one FastAPI dependency."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

from mmdet_ls.basic_auth import basic_auth_ok

from .http_io import unauthorized_response


class AuthRequired(Exception):
    """Raised by BasicAuth; the app answers it with `answer_auth_required`."""


async def answer_auth_required(request: Request, exc: AuthRequired) -> JSONResponse:
    return unauthorized_response()


class BasicAuth:
    """Refuses a request without the ingress's basic-auth credentials (when it
    has any). `for_health`: only when the ingress's health_requires_auth is
    set, so Label Studio's unauthenticated health checks keep working."""

    def __init__(self, for_health: bool = False):
        self.for_health = for_health

    async def __call__(self, request: Request) -> None:
        # The settings live on the ingress instance serving this request
        # (how Serve itself hands `self` to the routes).
        ingress = serve.get_replica_context().servable_object
        if self.for_health and not ingress.health_requires_auth:
            return
        if not basic_auth_ok(request.headers.get("Authorization", ""), ingress.basic_auth):
            raise AuthRequired()
