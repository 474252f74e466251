"""A chat backend on the ledger SDK: metered model calls, gate webhooks, a user's remaining budget."""
