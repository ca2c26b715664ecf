"""The budget service (counters with tenant/agent/provider/model attributes): the names of the metrics it emits (the mesh's own are ``mesh_kit.telemetry``'s)."""

M_BUDGET_TOKENS = "mesh.budget.tokens"  # attribute token.type = input | output | cached_input
M_BUDGET_COST = "mesh.budget.cost"  # unit USD
M_BUDGET_CALLS = "mesh.budget.calls"  # attribute outcome = ok | error
M_BUDGET_RESERVATIONS = "mesh.budget.reservations"  # attribute outcome = granted | denied, code
M_BUDGET_TRIPS = "mesh.budget.trips"  # breaker trips, deadlocks, stalls; attribute kind
M_TASKS_QUEUED = "mesh.tasks.queued"  # gauge, per tenant: tasks whose outstanding work waits to be taken up
M_TASKS_RUNNING = "mesh.tasks.running"  # gauge, per tenant: tasks with work taken up, not ended
