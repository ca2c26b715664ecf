"""AgentMesh rag service."""
