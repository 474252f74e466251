"""The control plane: tenants, hashed API keys, plans and their versions, users (SQLAlchemy 2)."""
