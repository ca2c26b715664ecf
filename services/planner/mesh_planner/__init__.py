"""AgentMesh planner service."""
