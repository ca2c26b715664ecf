"""AgentMesh evaluation: golden datasets run through a live mesh and gated on (``harness``, over
``dataset``, ``properties``, ``report`` and ``baseline``), the LLM judge calibrated against human
labels (``calibration``), what both print (``render``), and the ``meshctl eval`` command (``cli``)."""
