"""Durable execution above the bus runtime: what makes a crash repeat no effect and leave a
record nobody can rewrite. ``ledger`` (exactly-once results by call id), ``chain`` (the tenants'
tamper-evident audit chains), ``guard`` (control obeyed before every model or tool call),
``redis`` (a client that fails fast); and reading what the mesh keeps without a consumer:
``tail`` (streams and buckets by direct gets), ``view`` (keys kept current from a bucket's
feed), ``records`` (the records services read of each other's)."""
