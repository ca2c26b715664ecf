"""The checker (online evaluation; attributes mesh.tenant, gen_ai.agent.name, mesh.prompt.version): the names of the metrics it emits (the mesh's own are ``mesh_kit.telemetry``'s)."""

M_CHECK_VERDICTS = "mesh.check.verdicts"  # attribute outcome = passed | failed
M_CHECK_RESULTS = "mesh.check.results"  # one per property check; attributes check, outcome, scope
M_CHECK_JUDGE_SCORE = "mesh.check.judge.score"  # histogram of LLM-judge scores in [0, 1]
M_CHECK_GROUNDING = "mesh.check.grounding"  # histogram of an answer's lowest claim support in [0, 1]
