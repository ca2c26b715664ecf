"""AgentMesh agent side: what a service that calls a model needs on top of the bus runtime.

- ``metered``: one model call as the mesh makes it (reserve the worst case from the budget
  service, call through the gateway with retries and fallbacks, record usage, replay a recorded
  response from the ledger instead of paying twice);
- ``prices``: the versioned price table;
- ``prompts``: prompts as versioned files shipped in a service's package;
- ``settings``: ``AgentSettings``, what the three services below read for their model calls.

Only the planner, the worker and the checker use it; the other services never load the gateway.
"""
