"""Guardrails (counted by the services that score untrusted text): the names of the metrics it emits (the mesh's own are ``mesh_kit.telemetry``'s)."""

M_INJECTION_FLAGGED = "mesh.guardrails.injection_flagged"  # untrusted text scored at or above the threshold
