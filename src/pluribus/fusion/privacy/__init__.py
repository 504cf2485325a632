"""PrivFusion's privacy layer: where noise comes from (``noise``), the local-DP mechanisms (``ldp``) and the
ledger of what each party released (``accounting``)."""
