"""Example MCP servers shipped with the tool-executor.

They exist so the MCP mounting path (``mesh_tool_executor.mcp_mount``) can be exercised end to end
by the tests and the demo with a real stdio server process, without anything from the network.
"""
