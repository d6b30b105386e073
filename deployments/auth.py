"""Auth for the ingress's routes, as FastAPI dependencies: basic auth for the
Label Studio protocol, and for /jobs basic auth or a bearer token."""
from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

from mmdet_ls.basic_auth import basic_auth_ok, bearer_ok

from .http_io import error_response, unauthorized_response


class AuthRequired(Exception):
    """Raised by BasicAuth; the app answers it with `answer_auth_required`."""


class JobsAuthMissing(Exception):
    """/jobs called on a service with neither basic auth nor JOBS_TOKEN."""


JOBS_AUTH_MISSING = ("the jobs API acts with the operator's Label Studio key, so it needs authentication and none "
                     "is configured: set BASIC_AUTH_USER and BASIC_AUTH_PASS, or JOBS_TOKEN (16+ characters, sent "
                     "as 'Authorization: Bearer <token>'), in the environment of the Ray cluster")


async def answer_auth_required(request: Request, exc: AuthRequired) -> JSONResponse:
    return unauthorized_response()


async def answer_jobs_auth_missing(request: Request, exc: JobsAuthMissing) -> JSONResponse:
    return error_response(403, JOBS_AUTH_MISSING)


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


class JobsAuth:
    """/jobs: basic auth (when on) or `Bearer <JOBS_TOKEN>`; refused outright
    when neither is configured (the API writes with the operator's key)."""

    async def __call__(self, request: Request) -> None:
        ingress = serve.get_replica_context().servable_object
        if not ingress.basic_auth and not ingress.jobs_token:
            raise JobsAuthMissing()
        header = request.headers.get("Authorization", "")
        if bearer_ok(header, ingress.jobs_token):
            return
        if ingress.basic_auth and basic_auth_ok(header, ingress.basic_auth):
            return
        raise AuthRequired()


class WebhookAuth:
    """/webhook: basic auth (when on), or WEBHOOK_SECRET as the `secret`
    query parameter or the X-Webhook-Secret header: the webhook Label Studio
    creates for a backend sends no Authorization header."""

    async def __call__(self, request: Request) -> None:
        ingress = serve.get_replica_context().servable_object
        if basic_auth_ok(request.headers.get("Authorization", ""), ingress.basic_auth):
            return
        secret = ingress.webhook_secret
        if secret:
            given = request.headers.get("X-Webhook-Secret") or request.query_params.get("secret") or ""
            if hmac.compare_digest(given.encode("utf-8"), secret.encode("utf-8")):
                return
        raise AuthRequired()
