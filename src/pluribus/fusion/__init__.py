"""PrivFusion (a reconstruction from the paper's abstract): LDP model fusion by neuron matching + adapter.

Flower is imported only by :mod:`pluribus.fusion.exchange` (lazily) and :mod:`pluribus.fusion.flower_apps`
(the hub ServerApp and party ClientApp; loaded on first use of its exports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluribus.lazy import lazy_getattr

if TYPE_CHECKING:
    from pluribus.fusion.accounting import PrivacyLedger, Release, privacy_report, privacy_report_markdown
    from pluribus.fusion.adapter import AdaptedModel, fit_adapter
    from pluribus.fusion.config import AdapterConfig, FusionConfig, RunConfig
    from pluribus.fusion.descriptors import PartyRelease, release_party
    from pluribus.fusion.flower_apps import (
        FlowerFusionResult,
        PartyFiles,
        make_hub_app,
        make_party_app,
        run_fusion_flower,
        run_fusion_inprocess,
    )
    from pluribus.fusion.fuse import FusionResult, fuse_releases, load_fused, privfusion
    from pluribus.fusion.ldp import (
        DuchiMechanism,
        GaussianMechanism,
        HybridMechanism,
        LaplaceMechanism,
        Mechanism,
        PiecewiseMechanism,
        analytic_gaussian_sigma,
        make_mechanism,
    )
    from pluribus.fusion.matching import align, match_many, weight_matching
    from pluribus.fusion.models import MLP, SmallCNN
    from pluribus.fusion.party_files import (
        load_party_data,
        load_party_model,
        save_party_data,
        save_party_model,
    )
    from pluribus.fusion.spec import PermutationSpec, apply_perms, spec_for

_EXPORTS = {
    "PrivacyLedger": "accounting",
    "Release": "accounting",
    "privacy_report": "accounting",
    "privacy_report_markdown": "accounting",
    "AdaptedModel": "adapter",
    "fit_adapter": "adapter",
    "AdapterConfig": "config",
    "FusionConfig": "config",
    "RunConfig": "config",
    "PartyRelease": "descriptors",
    "release_party": "descriptors",
    "FlowerFusionResult": "flower_apps",
    "PartyFiles": "flower_apps",
    "make_hub_app": "flower_apps",
    "make_party_app": "flower_apps",
    "run_fusion_flower": "flower_apps",
    "run_fusion_inprocess": "flower_apps",
    "load_party_data": "party_files",
    "load_party_model": "party_files",
    "save_party_data": "party_files",
    "save_party_model": "party_files",
    "FusionResult": "fuse",
    "fuse_releases": "fuse",
    "load_fused": "fuse",
    "privfusion": "fuse",
    "DuchiMechanism": "ldp",
    "GaussianMechanism": "ldp",
    "HybridMechanism": "ldp",
    "LaplaceMechanism": "ldp",
    "Mechanism": "ldp",
    "PiecewiseMechanism": "ldp",
    "analytic_gaussian_sigma": "ldp",
    "make_mechanism": "ldp",
    "align": "matching",
    "match_many": "matching",
    "weight_matching": "matching",
    "MLP": "models",
    "SmallCNN": "models",
    "PermutationSpec": "spec",
    "apply_perms": "spec",
    "spec_for": "spec",
}

__getattr__ = lazy_getattr("pluribus.fusion", _EXPORTS)

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "DuchiMechanism",
    "FlowerFusionResult",
    "FusionConfig",
    "FusionResult",
    "GaussianMechanism",
    "HybridMechanism",
    "LaplaceMechanism",
    "MLP",
    "Mechanism",
    "PartyFiles",
    "PartyRelease",
    "PermutationSpec",
    "PiecewiseMechanism",
    "PrivacyLedger",
    "Release",
    "RunConfig",
    "SmallCNN",
    "align",
    "analytic_gaussian_sigma",
    "apply_perms",
    "fit_adapter",
    "fuse_releases",
    "load_fused",
    "load_party_data",
    "load_party_model",
    "make_hub_app",
    "make_mechanism",
    "make_party_app",
    "match_many",
    "privacy_report",
    "privacy_report_markdown",
    "privfusion",
    "release_party",
    "run_fusion_flower",
    "run_fusion_inprocess",
    "save_party_data",
    "save_party_model",
    "spec_for",
    "weight_matching",
]
