"""PrivFusion's experiment plumbing shared by the CLI and the benchmarks: data, splits and party models."""
