"""AgentMesh worker service."""
