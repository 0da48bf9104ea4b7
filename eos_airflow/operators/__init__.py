"""Adapters tier: the exactly-once operators (and the outbox relay), one module each."""
