"""The worker: the names of the metrics it emits (the mesh's own are ``mesh_kit.telemetry``'s)."""

M_TOKENS_STREAMED = "mesh.llm.tokens_streamed"  # text deltas forwarded to clients
M_FENCED = "mesh.steps.fenced"  # stale work refused because another delivery moved the step on
