"""AgentMesh evaluation: golden datasets run through a live mesh and gated on (``harness``), the
LLM judge calibrated against human labels, and the ``meshctl eval`` command (``cli``)."""
