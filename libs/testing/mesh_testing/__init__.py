"""Shared test fixtures and helpers for AgentMesh (``mesh_testing``).

Submodules are imported explicitly (e.g. ``mesh_testing.containers``) so that importing the
package pulls in no optional test dependency.
"""
