"""Who may import whom: the two services never import each other; the pure decision modules import nothing that
does I/O; the shared package reaches the services only from the CLI's service commands."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IO_MODULES = {"grpc", "asyncpg", "aiohttp", "prometheus_client", "google", "envoy", "stripe", "socket", "subprocess"}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(
    ("package", "forbidden"), [("authz_service", "billing_webhooks"), ("billing_webhooks", "authz_service")]
)
def test_the_services_never_import_each_other(package, forbidden):
    for path in modules(package):
        assert not any(name.split(".")[0] == forbidden for name in imports_of(path)), path


@pytest.mark.parametrize(
    "module",
    [
        "authz_service/decision.py",
        "authz_service/credentials.py",
        "authz_service/rate_limit.py",
        "authz_service/usage_ledger.py",
        "driftlock_gateway/billing_rules.py",
        "driftlock_gateway/periods.py",
        "driftlock_gateway/keys.py",
    ],
)
def test_pure_modules_import_nothing_that_does_io(module):
    roots = {name.split(".")[0] for name in imports_of(ROOT / module)}
    assert not roots & IO_MODULES, roots & IO_MODULES


def test_the_shared_package_reaches_services_only_from_the_cli():
    for path in modules("driftlock_gateway"):
        if path.name.startswith("cli"):  # cli.py and cli_webhooks.py start the services
            continue
        roots = {name.split(".")[0] for name in imports_of(path)}
        assert not roots & {"authz_service", "billing_webhooks"}, path
