"""The migrations build exactly the schema the models declare, on either database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from reasoning_agent.storage import db
from reasoning_agent.tasks.models import Base
from tests.support import drop_database, new_database


def test_the_migrations_build_the_schema_the_models_declare(tmp_path: Path) -> None:
    url = new_database(tmp_path)

    async def differences() -> list[Any]:
        engine = db.create_engine(url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(
                    lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
                )
        finally:
            await engine.dispose()

    try:
        db.migrate(url)
        assert asyncio.run(differences()) == []
    finally:
        drop_database(url)
