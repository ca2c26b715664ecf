"""The tool-executor: the names of the metrics it emits (the mesh's own are ``mesh_kit.telemetry``'s)."""

M_TOOL_DRY_RUNS = "mesh.tool.dry_runs"  # a replay's write or external tool call answered without performing it
M_TOOL_DECISIONS = "mesh.tools.decisions"  # tool-policy decisions recorded as tool.audited
M_RATE_LIMIT_LOCAL = "mesh.tool.rate_limit.local"  # a rate-limit decision taken in the process because Redis was down
M_APPROVAL_DECISIONS_REFUSED = "mesh.tool.approval.decisions_refused"  # by an approver not (or no longer) the tenant's
M_APPROVALS_VOID = "mesh.tool.approvals.void"  # approvals void because their task ended before a decision
M_SERVER_CALLS = "mesh.tool.server.calls"  # calls to tenants' tool servers, by outcome (ok, lost, auth, ...)
M_SERVER_FAILOVERS = "mesh.tool.server.failovers"  # calls answered by another replica after one failed
M_SERVER_SUSPENSIONS = "mesh.tool.server.suspensions"  # approved tools suspended because their definition changed
M_SERVER_CHANGES = "mesh.tool.server.changes"  # tools.change handled, by action and whether accepted
