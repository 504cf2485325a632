"""FedBone's core, plain PyTorch with no files and no network: configs, the split model, the gradient
aggregation, the message payloads and one training step over any ``Transport``."""
