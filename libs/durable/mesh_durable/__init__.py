"""Durable execution above the bus runtime: what makes a crash repeat no effect and leave a
record nobody can rewrite. ``ledger`` (exactly-once results by call id), ``chain`` (the tenants'
tamper-evident audit chains), ``guard`` (control obeyed before every model or tool call),
``redis`` (a client that fails fast)."""
