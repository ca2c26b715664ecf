"""Metered model calls: the names of the metrics it emits (the GenAI ones are ``genai``'s, the bus runtime's ``mesh_kit.telemetry``'s)."""

M_LLM_CALLS = "mesh.llm.calls"
M_LLM_REPLAYED = "mesh.llm.replayed"  # a replay's call answered from the replayed task's recording: no cost
M_LLM_CACHE_HITS = "mesh.llm.cache.hits"  # answered from the response cache: no provider call, no cost
M_LLM_CACHE_MISSES = "mesh.llm.cache.misses"
