"""meshctl's own commands, one module per group, each adding its parsers with ``register(sub)``
(``meshctl.cli`` assembles them; ``workflow``, ``release`` and ``review`` keep theirs beside their
logic, and other packages add theirs through the ``meshctl.commands`` entry point)."""
