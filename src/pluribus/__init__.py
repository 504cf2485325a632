"""pluribus: user representations and models across sources, tasks and institutions, privately.

Four systems share one data layer and one evaluation kit:

- ``pluribus.tokenizer`` (U2QT): multi-view RQ-VAE user tokenizer.
- ``pluribus.encoder`` (GGSM): decoder-only LLM user encoder with soft attention masks.
- ``pluribus.federated`` (FedBone): federated multi-task split learning with gradient projection.
- ``pluribus.fusion`` (PrivFusion): locally differentially private model fusion by neuron matching.
"""

from pluribus.errors import ConfigError, DataError, PluribusError, ShapeError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "PluribusError", "ShapeError", "__version__"]
