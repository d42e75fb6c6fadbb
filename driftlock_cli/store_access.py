"""How the management commands reach the kernel's stores: one transaction per command, and the one-line error
a refusal of the stores becomes."""

from collections.abc import Callable, Coroutine
from typing import Any

from driftlock_kernel import db
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.settings import Settings

PROG = "driftlock-gateway"


class ManagementCommandError(OperatorError):
    pass


async def in_transaction(settings: Settings, work: Callable[[db.Connection], Coroutine[Any, Any, Any]]) -> Any:
    async with db.connection(
        settings.require_database_url(),
        application_name=f"{PROG} cli",
        transaction_pooler=settings.database_transaction_pooler,
    ) as conn:
        async with conn.transaction():
            return await work(conn)
