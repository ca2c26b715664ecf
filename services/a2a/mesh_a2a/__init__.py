"""The A2A gateway: AgentMesh's agents for other agents, over the A2A protocol.

A tenant's agents (``mesh``, where the planner decides, and each workflow it registered) each get
an agent card and a JSON-RPC endpoint (``a2a-sdk``'s server: send, stream, get, cancel,
resubscribe, push notifications). A caller signs in with a JWT from the organisation's identity
provider, as at the edge, and the gateway speaks to the mesh as the caller's tenant, with that
tenant's client identity: an A2A task is a mesh task, under the same admission, budget,
guardrails, approvals, audit and history as any other.
"""
