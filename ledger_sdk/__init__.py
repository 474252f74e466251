"""The usage-ledger Python SDK."""
