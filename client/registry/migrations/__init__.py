"""Alembic migrations of the registry tables (client/registry/schema.py); run by
client/registry/migrate.py, configured in code (no alembic.ini).  One file per revision in
``versions/``; see docs/OPERATIONS.md "Schema migrations" for how to add one."""
