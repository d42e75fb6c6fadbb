"""The command line's argument types and shared options, written once for every command module.

Each type turns one argument's text into its value or raises argparse.ArgumentTypeError, which argparse prints as
the one-line usage error the contract asks for."""

import argparse
import uuid
from collections.abc import Callable
from datetime import timedelta

from driftlock_kernel import keys
from driftlock_kernel.durations import parse_duration
from driftlock_kernel.settings import HostPort, SettingsError, parse_host_port

# Listings page at most this many rows at once.
MAX_LIMIT = 10_000


def uuid_of(what: str) -> Callable[[str], uuid.UUID]:
    def parse(text: str) -> uuid.UUID:
        try:
            return uuid.UUID(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"malformed {what} {text!r}: expected a UUID") from None

    return parse


org_id = uuid_of("organisation id")
key_id = uuid_of("key id")


def duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def scopes(text: str) -> tuple[keys.Scope, ...]:
    try:
        return keys.parse_scopes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def whole_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_LIMIT}, got {text!r}")
    return int(text)


def host_port(what: str) -> Callable[[str], HostPort]:
    def parse(text: str) -> HostPort:
        try:
            return parse_host_port(text, what=what)
        except SettingsError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def add_org_option(parser: argparse.ArgumentParser, help_text: str | None, *, required: bool = False) -> None:
    """`--org ORG_ID`: the organisation a command is about, or restricted to."""
    parser.add_argument("--org", type=org_id, required=required, metavar="ORG_ID", help=help_text)


def add_limit_option(parser: argparse.ArgumentParser, default: int, help_text: str) -> None:
    """`--limit N`: at most N rows (1 to MAX_LIMIT)."""
    parser.add_argument("--limit", type=limit, default=default, metavar="N", help=help_text)
