"""FedBone: federated multi-task split learning with conflicting-gradient projection.

Public API (flwr is imported only by ``client_app`` / ``server_app``):

- aggregation: ``gp_aggregate`` (matrix [N, P] -> vector [P]), ``GPAggregator`` (keeps the history),
  ``pcgrad_coefficients``, ``attention_weights``;
- split model: ``GeneralModel`` (server), ``ClientModel`` (client embedding + adapter + head),
  ``PatchEmbedding``, ``TokenEmbedding``;
- training: ``run_fedbone(config)`` in-process (FedBone or a baseline by ``config.algorithm``),
  ``FedBoneSimulation`` for step-by-step control;
- configs: ``FedBoneConfig``, ``ModelConfig``, ``AggregationConfig``; tasks: ``build_suite`` (built-in
  suites), ``client_tasks_from_features`` (any per-user feature tokens + a ``UserDataset``'s tasks, for
  ``suite="custom"``; pass ``general_model=`` to ``run_fedbone`` to train your own backbone),
  ``save_feature_suite`` (the same as a file, for ``suite="features"`` on Flower);
- Flower: ``run_fedbone_flower(config, engine="inprocess" | "simulation" | "deployment")`` (a ``RunResult``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluribus.lazy import lazy_getattr

_EXPORTS = {
    "AggregationStats": "core.aggregation",
    "GPAggregator": "core.aggregation",
    "attention_weights": "core.aggregation",
    "gp_aggregate": "core.aggregation",
    "pcgrad_coefficients": "core.aggregation",
    "AggregationConfig": "core.config",
    "FedBoneConfig": "core.config",
    "ModelConfig": "core.config",
    "run_fedbone_flower": "flower.run",
    "FlowerRunResult": "flower.run",
    "FedBoneSimulation": "studies.simulate",
    "RunResult": "studies.results",
    "run_fedbone": "studies.simulate",
    "ClientModel": "core.split",
    "GeneralModel": "core.split",
    "PatchEmbedding": "core.split",
    "TokenEmbedding": "core.split",
    "ClientTask": "core.task",
    "build_suite": "studies.tasks",
    "client_tasks_from_features": "studies.tasks",
    "load_feature_suite": "studies.tasks",
    "save_feature_suite": "studies.tasks",
}

if TYPE_CHECKING:
    from pluribus.federated.core.aggregation import (
        AggregationStats,
        GPAggregator,
        attention_weights,
        gp_aggregate,
        pcgrad_coefficients,
    )
    from pluribus.federated.core.config import AggregationConfig, FedBoneConfig, ModelConfig
    from pluribus.federated.core.split import ClientModel, GeneralModel, PatchEmbedding, TokenEmbedding
    from pluribus.federated.core.task import ClientTask
    from pluribus.federated.flower.run import FlowerRunResult, run_fedbone_flower
    from pluribus.federated.studies.results import RunResult
    from pluribus.federated.studies.simulate import FedBoneSimulation, run_fedbone
    from pluribus.federated.studies.tasks import (
        build_suite,
        client_tasks_from_features,
        load_feature_suite,
        save_feature_suite,
    )


__getattr__ = lazy_getattr("pluribus.federated", _EXPORTS)


__all__ = [
    "AggregationConfig",
    "AggregationStats",
    "ClientModel",
    "ClientTask",
    "FlowerRunResult",
    "FedBoneConfig",
    "FedBoneSimulation",
    "GPAggregator",
    "GeneralModel",
    "ModelConfig",
    "PatchEmbedding",
    "RunResult",
    "TokenEmbedding",
    "attention_weights",
    "build_suite",
    "client_tasks_from_features",
    "gp_aggregate",
    "load_feature_suite",
    "pcgrad_coefficients",
    "run_fedbone",
    "run_fedbone_flower",
    "save_feature_suite",
]
