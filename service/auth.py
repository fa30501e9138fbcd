"""Bearer-token checks (constant-time): the admin token for admin endpoints, and the optional feedback token
for /feedback. A token is never logged or echoed."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

# The schemes as OpenAPI documents them (the /docs page's Authorize button sends the header); they refuse
# nothing: the header is read and judged below, with errors that name the variable.
ADMIN_SCHEME = HTTPBearer(
    scheme_name="admin", auto_error=False, description="DRIFTLOOP_ADMIN_TOKEN; unset: admin routes answer 403"
)
FEEDBACK_SCHEME = HTTPBearer(
    scheme_name="feedback",
    auto_error=False,
    description="DRIFTLOOP_FEEDBACK_TOKEN, or the admin token; unset: /feedback is open",
)
Documented = HTTPAuthorizationCredentials | None


def require_admin(request: Request, _: Annotated[Documented, Depends(ADMIN_SCHEME)]) -> None:
    token = request.app.state.ctx.settings.admin_token
    if token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "admin endpoints are disabled: set DRIFTLOOP_ADMIN_TOKEN, then send "
            "'Authorization: Bearer <token>'",
        )
    if not _matches(_bearer(request, "DRIFTLOOP_ADMIN_TOKEN"), token):
        raise _invalid()


def require_feedback(request: Request, _: Annotated[Documented, Depends(FEEDBACK_SCHEME)]) -> None:
    """Open unless DRIFTLOOP_FEEDBACK_TOKEN is set; then it, or the admin token, must be sent. Labels decide
    what a retrain learns and what the gate judges by: whoever may send them can steer the model."""
    settings = request.app.state.ctx.settings
    if settings.feedback_token is None:
        return
    given = _bearer(request, "DRIFTLOOP_FEEDBACK_TOKEN")
    admin = settings.admin_token
    # Both compared, whatever the first says: the time taken tells nothing of which one matched.
    feedback_ok = _matches(given, settings.feedback_token)
    admin_ok = admin is not None and _matches(given, admin)
    if not (feedback_ok or admin_ok):
        raise _invalid()


def _bearer(request: Request, variable: str) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        # Another scheme (Basic …) was "missing bearer token" too, to a client that had sent a header. Its
        # words are not echoed: without a scheme, the first word is the credential itself.
        problem = "no bearer token in the Authorization header" if header.strip() else "missing bearer token"
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"{problem}: send 'Authorization: Bearer <{variable}>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return given.strip()


def _matches(given: str, token: SecretStr) -> bool:
    return hmac.compare_digest(given.encode(), token.get_secret_value().encode())


def _invalid() -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
    )


# Checked before a route's body is read (service.lean.StrictJsonRoute), as well as by FastAPI.
TOKEN_CHECKS = (require_admin, require_feedback)

Admin = Annotated[None, Depends(require_admin)]
Feedback = Annotated[None, Depends(require_feedback)]
