"""PrivFusion on Flower: each party a ClientApp holding its own model and data files, a hub ServerApp that
relays, and ``run_fusion_flower`` on the in-process, simulation or deployment engine."""
