"""The cluster secret check in front of every call.

Every call must carry ``authorization: Bearer <cluster secret>`` metadata;
anything else is answered UNAUTHENTICATED before it reaches the servicer.
The comparison takes constant time (``hmac.compare_digest``), and neither
the expected nor the presented secret is ever logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)


class AuthInterceptor(grpc.ServerInterceptor):
    """Lets a call through only when it presents the cluster secret."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        self._expected = f"Bearer {secret}".encode()
        # Every Shoal RPC is unary-unary, so one rejecting handler fits all.
        self._reject = grpc.unary_unary_rpc_method_handler(_unauthenticated)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value if isinstance(value, str) else value.decode("utf-8", "replace")
                break
        if hmac.compare_digest(presented.encode(), self._expected):
            return continuation(handler_call_details)
        reason = "wrong cluster secret" if presented else "no authorization metadata"
        log.warning("rejected a call to %s: %s", handler_call_details.method, reason)
        return self._reject


def _unauthenticated(request: Any, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster secret")
