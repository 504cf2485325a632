"""FedBone on Flower: the ServerApp, the ClientApp (in-process, or thin with a long-lived worker on the client's
host) and ``run_fedbone_flower`` on the in-process, simulation or deployment engine.

Importing this package loads nothing: the thin ClientApp path must stay free of torch (see ``client_app``)."""
