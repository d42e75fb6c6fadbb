"""One check, start to finish, in domain terms: route, credential, grant, decision. No protobuf here."""

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from authz_service import metrics
from authz_service.credentials import read_credential
from authz_service.decision import (
    DEFAULT_POLICY,
    DENY_UNAVAILABLE,
    BillingPolicy,
    Decision,
    DenyCode,
    Grant,
    Route,
    RouteError,
    decide,
    deny,
    effective_plan,
    is_billed,
    route_from_context,
)
from authz_service.grants import GrantStore, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """The parts of Envoy's CheckRequest that a decision needs."""

    request_id: str
    method: str
    path: str
    headers: Mapping[str, str]
    context: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    grant: Grant | None = None
    route: Route | None = None
    billed: bool = False
    plan: str | None = None  # the effective plan, as the backend is told


class Authorizer:
    def __init__(
        self, store: GrantStore, *, policy: BillingPolicy = DEFAULT_POLICY, clock: Callable[[], float] = time.time
    ):
        self._store = store
        self._policy = policy
        self._clock = clock

    async def check(self, request: AccessRequest) -> Outcome:
        try:
            route = route_from_context(request.context)
        except RouteError as error:
            # A route table mistake must not open the backend: fail closed, loudly.
            metrics.ROUTE_ERRORS.inc()
            log.error("refusing %s %s: %s", request.method, request.path.split("?", 1)[0], error)
            return Outcome(DENY_UNAVAILABLE)
        credential = read_credential(request.headers)
        if isinstance(credential, DenyCode):
            return Outcome(deny(credential), route=route)
        try:
            grant = await self._store.get(credential.hash)
        except StoreUnavailable:
            return Outcome(DENY_UNAVAILABLE, route=route)
        if grant is None:
            return Outcome(deny(DenyCode.INVALID_API_KEY), route=route)
        decision = decide(route, grant, self._clock(), policy=self._policy)
        return Outcome(
            decision,
            grant,
            route,
            billed=decision.allowed and is_billed(route, grant),
            plan=effective_plan(grant, self._policy),
        )
