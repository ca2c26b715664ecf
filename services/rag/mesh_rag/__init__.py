"""AgentMesh rag service."""

import os

# One BLAS thread per process unless told otherwise (MESH_EMBED_THREADS). Measured on a 2-core
# machine shared with other work: OpenBLAS's default of one thread per core spins against the
# other load and embeds 3.2 chunks/s (a query: 218 ms); one thread does 14.8 chunks/s (23 ms).
# Scale the service with replicas, not threads. Set before numpy is first imported.
# Read from the environment here, not from RagSettings: this runs before numpy loads, before any
# settings exist (RagSettings.embed_threads documents the variable and validates it at start-up).
_threads = os.environ.get("MESH_EMBED_THREADS", "1")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _threads)
