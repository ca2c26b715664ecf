"""AgentMesh budget service."""
