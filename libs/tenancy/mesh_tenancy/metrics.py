"""The tenants' doors: the names of the metrics they emit (the bus's own are ``mesh_kit.telemetry``'s)."""

M_DOOR_STORED = "mesh.door.stored"  # a tenant's message checked, charged and stored at a door; tenant, stream
M_DOOR_REFUSED = "mesh.door.refused"  # a tenant's message a door did not store; attributes tenant, code
