"""Who may import whom. Every arrow points one way:

    driftlock_cli ──▶ authz_service, billing_webhooks ──▶ driftlock_kernel, driftlock_api

The two services never import each other, the kernel and the generated API import neither a service nor the CLI,
nothing outside the tests imports the tests, and the pure decision modules import nothing that does I/O. Every
import counts: at the top of a module, inside a function, or relative.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("driftlock_kernel", "driftlock_api", "driftlock_cli", "authz_service", "billing_webhooks", "bench", "tests")
# What each package may import of ours (itself included).
ALLOWED = {
    "driftlock_api": {"driftlock_api"},
    "driftlock_kernel": {"driftlock_kernel"},
    "authz_service": {"authz_service", "driftlock_kernel", "driftlock_api"},
    "billing_webhooks": {"billing_webhooks", "driftlock_kernel", "driftlock_api"},
    "driftlock_cli": {"driftlock_cli", "authz_service", "billing_webhooks", "driftlock_kernel", "driftlock_api"},
    "bench": {"bench", "driftlock_cli", "authz_service", "billing_webhooks", "driftlock_kernel", "driftlock_api"},
}
IO_MODULES = {
    "grpc",
    "asyncpg",
    "aiohttp",
    "prometheus_client",
    "google",
    "envoy",
    "stripe",
    "socket",
    "subprocess",
    "redis",
}
PURE_MODULES = [
    "authz_service/check/decision.py",
    "authz_service/check/credentials.py",
    "authz_service/check/rate_limit.py",
    "authz_service/check/networks.py",
    "authz_service/check/controls.py",
    "authz_service/check/quota_headers.py",
    "authz_service/usage/usage_ledger.py",
    "authz_service/usage/refunds.py",
    "authz_service/usage/rollups.py",
    "billing_webhooks/inbox/decisions.py",
    "billing_webhooks/usage_export/exports.py",
    "billing_webhooks/inbox/events.py",
    "driftlock_kernel/billing.py",
    "driftlock_kernel/periods.py",
    "driftlock_kernel/keys.py",
    "driftlock_kernel/durations.py",
    "driftlock_kernel/caches.py",
]


def imports_in(source: str, package: str) -> set[str]:
    """Every module `source` (a module of `package`) imports, as absolute dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                if node.module:
                    found.add(f"{base}.{node.module}")
                else:
                    found.update(f"{base}.{alias.name}" for alias in node.names)
            elif node.module:
                found.add(node.module)
    return found


def imports_of(path: Path) -> set[str]:
    return imports_in(path.read_text(), ".".join(path.relative_to(ROOT).parts[:-1]))


def ours(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names} & set(OURS)


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package):
    assert modules(package), f"{package} has no modules"
    wrong = {
        str(path.relative_to(ROOT)): sorted(ours(imports_of(path)) - ALLOWED[package]) for path in modules(package)
    }
    assert {path: names for path, names in wrong.items() if names} == {}


def test_the_checker_sees_imports_inside_functions_and_relative_ones():
    source = "def f():\n    from billing_webhooks import app\n    from . import decision\n    import driftlock_cli\n"
    found = imports_in(source, "authz_service")
    assert found == {"billing_webhooks", "authz_service.decision", "driftlock_cli"}
    assert ours(found) - ALLOWED["authz_service"] == {"billing_webhooks", "driftlock_cli"}


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_import_nothing_that_does_io(module):
    path = ROOT / module
    roots = {name.split(".")[0] for name in imports_of(path)}
    assert not roots & IO_MODULES, roots & IO_MODULES
    # Nor anything of ours that is not pure itself.
    ours = {name for name in imports_of(path) if name.split(".")[0] in OURS}
    pure = {m.removesuffix(".py").replace("/", ".") for m in PURE_MODULES}
    assert ours <= pure, ours - pure


# Modules of the check pipeline that speak in domain types only: Envoy's protobuf is converted at the wire edge
# (ext_authz.py), so neither the request type nor the pipeline holds a protobuf message.
NO_WIRE_MODULES = ["authz_service/check/authorizer.py", "authz_service/check/assembly.py"]
WIRE_MODULES = {"grpc", "google", "envoy"}


@pytest.mark.parametrize("module", NO_WIRE_MODULES)
def test_the_check_pipeline_imports_no_wire_types(module):
    roots = {name.split(".")[0] for name in imports_of(ROOT / module)}
    assert not roots & WIRE_MODULES, roots & WIRE_MODULES
