"""The rag service: the names of the metrics it emits (the mesh's own are ``mesh_kit.telemetry``'s)."""

M_RETRIEVAL_CACHE_HITS = "mesh.rag.cache.hits"  # retrievals answered from Redis for the current index version
M_RETRIEVAL_CACHE_MISSES = "mesh.rag.cache.misses"
M_RETRIEVAL_CACHE_ERRORS = "mesh.rag.cache.errors"  # a cache read or write that failed: served as a miss
