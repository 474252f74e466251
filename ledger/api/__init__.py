"""The HTTP API (FastAPI): configuration now; ingest, checks and queries as they land."""
