"""Durable execution (the guard and those who ask it): the names of the metrics it emits (the mesh's own are ``mesh_kit.telemetry``'s)."""

M_CALLS_REFUSED = "mesh.control.calls_refused"  # model/tool calls not made: halted, cancelled, kill switch, denied
