"""AgentMesh tool-executor service."""
