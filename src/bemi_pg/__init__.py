"""bemi-pg: a self-hosted, Postgres-native audit trail (Bemi-compatible ``changes`` table)."""

from __future__ import annotations

__version__ = "0.1.0"
