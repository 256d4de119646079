"""Framework integrations: SQLAlchemy, Django, ASGI. Each imports its framework lazily."""
