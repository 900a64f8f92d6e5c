"""Alembic migration scripts (run by `relay migrate`, see relay/queue/migrate.py)."""
