"""Ledger tier: the ledger schema, its one gateway (:mod:`.store`), the hash chain and the tools around it."""
