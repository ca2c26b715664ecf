"""meshctl: operate an AgentMesh."""
