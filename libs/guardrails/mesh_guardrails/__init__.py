"""AgentMesh guardrails: what stands between untrusted text and a model, a tool or a log line.

- ``injection``: a scorer for prompt-injection signals and the delimiters untrusted text is wrapped in;
- ``provenance``: every byte of a prompt is trusted from a named origin or untrusted with its score;
- ``redact``: finds and masks secrets and personal data; ``logfilter`` applies it to every log record.

Pure functions over strings: no I/O, no bus, no model. Import the module you need (``injection``
is large; the log filter does not load it).
"""
