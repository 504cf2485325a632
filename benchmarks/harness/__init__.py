"""The harness every benchmark shares: interleaved timing (``timing``) and the ``--device`` option (``devices``).

Benchmarks run as scripts (``python benchmarks/<system>/<name>.py``); each puts ``benchmarks/`` on ``sys.path``
first and imports ``harness.timing`` / ``harness.devices`` from here."""
