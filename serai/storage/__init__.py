"""Persistence: SQLAlchemy tables, the database engine, and Alembic migrations."""
