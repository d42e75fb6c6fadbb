"""How long a billable call can last at the edge, read from Envoy's own config: the one source of the time a counted
unit waits for the refund of its call before it is reported to Stripe (the settle window).

authz counts a call when Envoy asks it, as soon as the request's headers are in. From then:
- the body may trickle in for up to the connection manager's `request_timeout` (Envoy disarms it when the whole
  request has been received);
- the backend then has the route's `timeout`, which Envoy starts only once the request is complete;
- when the call is over, Envoy's access log carries a refund to authz, whose meter stores it at its next flush.

So the refund of a counted call is stored at most `request_timeout` + the longest backend route's timeout +
REFUND_DELIVERY_MARGIN after the count. A 2xx is never refunded (authz_service/usage/refunds.py), so the time a
slow client takes to read an answer does not count.
"""

import logging
from pathlib import Path
from typing import Any

import yaml

from driftlock_kernel.errors import OperatorError, one_line
from driftlock_kernel.settings import Settings

log = logging.getLogger(__name__)

# The access log's delivery to authz (Envoy buffers entries for up to a second), the meter's flush interval and a
# flush that is retried a few times, and the clocks of the two services: generous, as the cost is a later report.
REFUND_DELIVERY_MARGIN_SECONDS = 30.0
PUBLIC_LISTENER = "public"
BACKEND_CLUSTER = "backend"
SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "envoy" / "envoy.yaml"


class UnboundedCall(ValueError):
    """The config lets a billable call last without end (a timeout of 0 disables it in Envoy)."""


def _seconds(value: Any, what: str) -> float:
    # Envoy's YAML durations are protobuf Durations in their JSON form: "120s", "0.5s".
    text = str(value).strip()
    if not text.endswith("s"):
        raise ValueError(f"{what}: not a duration: {value!r}")
    seconds = float(text[:-1])
    if seconds <= 0:
        raise UnboundedCall(f"{what} is {value!r}: Envoy lets the call last without end")
    return seconds


def longest_billable_call(config: dict) -> float:
    """Seconds from the count of a call to the end of the call, at most, under this Envoy config."""
    (listener,) = [item for item in config["static_resources"]["listeners"] if item["name"] == PUBLIC_LISTENER]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    if "request_timeout" not in manager:
        raise UnboundedCall("the public listener has no request_timeout: a request body may trickle in without end")
    request = _seconds(manager["request_timeout"], "request_timeout")
    routes = [
        route["route"]
        for host in manager["route_config"]["virtual_hosts"]
        for route in host["routes"]
        if route.get("route", {}).get("cluster") == BACKEND_CLUSTER
    ]
    if not routes:
        raise ValueError("no route to the backend in Envoy's config")
    # Envoy's default route timeout is 15 s.
    backend = max(_seconds(route.get("timeout", "15s"), "a backend route's timeout") for route in routes)
    return request + backend


def settle_seconds(config: dict) -> float:
    """How long a counted unit waits for the refund of its call before it is reported."""
    return longest_billable_call(config) + REFUND_DELIVERY_MARGIN_SECONDS


def envoy_config(path: str | None) -> dict:
    """The Envoy config at `path` (DRIFTLOCK_ENVOY_CONFIG), else the one shipped in envoy/."""
    return yaml.safe_load(Path(path or SHIPPED_CONFIG).read_text())


def refund_window(settings: Settings) -> float:
    """How long after a count the refund of its call may still come: what the exporter waits before reporting a
    unit (its settle window), and what authz waits before it alerts on usage or refuses at a cap for the rest of
    the period. Derived from Envoy's timeouts (the one source) unless DRIFTLOCK_STRIPE_SETTLE_SECONDS sets it; a
    setting shorter than a call can last is used as given (tests, the dev stack), with a warning."""
    try:
        derived = settle_seconds(envoy_config(settings.envoy_config_path))
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as error:
        if settings.stripe_settle_seconds is None:
            raise OperatorError(
                f"cannot derive the settle window from Envoy's config ({one_line(error)}); "
                "set DRIFTLOCK_ENVOY_CONFIG or DRIFTLOCK_STRIPE_SETTLE_SECONDS"
            ) from None
        return settings.stripe_settle_seconds
    if settings.stripe_settle_seconds is None:
        return derived
    if settings.stripe_settle_seconds < derived:
        log.warning(
            "DRIFTLOCK_STRIPE_SETTLE_SECONDS=%s is shorter than a billable call can last at the edge (%s s from "
            "Envoy's timeouts): refunds of the slowest calls may come after their units were reported",
            settings.stripe_settle_seconds,
            derived,
        )
    return settings.stripe_settle_seconds
