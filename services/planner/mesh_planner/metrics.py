"""The planner: the names of the metrics it emits (the mesh's own are ``mesh_kit.telemetry``'s)."""

M_ADMITTED = "mesh.admission.admitted"  # submissions the planner admitted; attribute tenant
M_REFUSED = "mesh.admission.refused"  # refused at the door (over a tenant's limit); attributes tenant, code
M_SLOT_WAITS = "mesh.admission.slot_waits"  # an admitted task set to wait for a run slot; attribute tenant
M_PLANNING_WAITS = "mesh.planner.planning_waits"  # an admitted task parked for a planning slot; attribute tenant
M_RELEASE_DECISIONS = "mesh.release.decisions"  # canaries promoted or rolled back (by the sequential test or a person)
