"""The audit-trail explorer served by ``bemi-pg serve``: HTML pages and their JSON twins.

Needs the ``ui`` extra (Starlette and uvicorn); the poller never imports it."""
