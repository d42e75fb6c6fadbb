"""The environment of an authz process a test starts on its own (not as part of a stack): its settings by
attribute name, written through the declarations as `dev` writes its children's."""

from driftlock_kernel.settings import Settings
from tests.support.admin import signing_key_env
from tests.support.authz_requests import EXT_AUTHZ_SECRET


def authz_env(database_url: str, jwt_secret: str, port: int, metrics_port: int, **settings: object) -> dict[str, str]:
    """authz on 127.0.0.1:`port` with Envoy's secret the tests' checks carry, a fresh context-signing key, and
    `settings` (Settings attribute names) on top."""
    return {
        **Settings.environment_for(
            database_url=database_url,
            jwt_secret=jwt_secret,
            ext_authz_secret=EXT_AUTHZ_SECRET,
            authz_host="127.0.0.1",
            authz_port=port,
            authz_metrics_port=metrics_port,
            **settings,
        ),
        **signing_key_env(),
        "PYTHONUNBUFFERED": "1",  # its log lines reach the file as they are written
    }
