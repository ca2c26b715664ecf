"""AgentMesh checker service."""
