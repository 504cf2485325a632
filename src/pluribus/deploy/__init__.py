"""Deploy a federation across institutions on Flower's own binaries (one module per job).

- :mod:`~pluribus.deploy.certs`: a test CA, a SuperLink certificate and node key pairs (NOT FOR PRODUCTION);
  checks of CA certificates and node keys;
- :mod:`~pluribus.deploy.address`: ``host:port`` addresses, TLS unless asked otherwise, a bounded preflight;
- :mod:`~pluribus.deploy.host`: start the SuperLink (TLS, SuperNode authentication), register node keys;
- :mod:`~pluribus.deploy.join`: start an institution's SuperNode with its own files;
- :mod:`~pluribus.deploy.submit`: submit a FedBone or PrivFusion run to a SuperLink that already runs;
- :mod:`~pluribus.deploy.processes`: start, wait for and stop those processes (by PID, under deadlines).

docs/deploy.md is the walk-through, host by host.
"""
