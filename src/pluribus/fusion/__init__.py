"""PrivFusion (a reconstruction from the paper's abstract): LDP model fusion by neuron matching + adapter.

Flower is imported only by :mod:`pluribus.fusion.core.exchange` (lazily) and :mod:`pluribus.fusion.flower.apps`
(the hub ServerApp and party ClientApp; loaded on first use of its exports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluribus.lazy import lazy_getattr

if TYPE_CHECKING:
    from pluribus.fusion.core.adapter import AdaptedModel, fit_adapter
    from pluribus.fusion.core.config import AdapterConfig, FusionConfig, RunConfig
    from pluribus.fusion.core.descriptors import PartyRelease, release_party
    from pluribus.fusion.core.fuse import FusionResult, fuse_releases, load_fused, privfusion
    from pluribus.fusion.core.matching import align, match_many, weight_matching
    from pluribus.fusion.core.models import MLP, SmallCNN
    from pluribus.fusion.core.spec import PermutationSpec, apply_perms, spec_for
    from pluribus.fusion.flower.apps import (
        FlowerFusionResult,
        PartyFiles,
        make_hub_app,
        make_party_app,
        run_fusion_flower,
        run_fusion_inprocess,
    )
    from pluribus.fusion.flower.party_files import (
        load_party_data,
        load_party_model,
        save_party_data,
        save_party_model,
    )
    from pluribus.fusion.privacy.accounting import (
        PrivacyLedger,
        Release,
        privacy_report,
        privacy_report_markdown,
    )
    from pluribus.fusion.privacy.ldp import (
        DuchiMechanism,
        GaussianMechanism,
        HybridMechanism,
        LaplaceMechanism,
        Mechanism,
        PiecewiseMechanism,
        analytic_gaussian_sigma,
        make_mechanism,
    )

_EXPORTS = {
    "PrivacyLedger": "privacy.accounting",
    "Release": "privacy.accounting",
    "privacy_report": "privacy.accounting",
    "privacy_report_markdown": "privacy.accounting",
    "AdaptedModel": "core.adapter",
    "fit_adapter": "core.adapter",
    "AdapterConfig": "core.config",
    "FusionConfig": "core.config",
    "RunConfig": "core.config",
    "PartyRelease": "core.descriptors",
    "release_party": "core.descriptors",
    "FlowerFusionResult": "flower.apps",
    "PartyFiles": "flower.apps",
    "make_hub_app": "flower.apps",
    "make_party_app": "flower.apps",
    "run_fusion_flower": "flower.apps",
    "run_fusion_inprocess": "flower.apps",
    "load_party_data": "flower.party_files",
    "load_party_model": "flower.party_files",
    "save_party_data": "flower.party_files",
    "save_party_model": "flower.party_files",
    "FusionResult": "core.fuse",
    "fuse_releases": "core.fuse",
    "load_fused": "core.fuse",
    "privfusion": "core.fuse",
    "DuchiMechanism": "privacy.ldp",
    "GaussianMechanism": "privacy.ldp",
    "HybridMechanism": "privacy.ldp",
    "LaplaceMechanism": "privacy.ldp",
    "Mechanism": "privacy.ldp",
    "PiecewiseMechanism": "privacy.ldp",
    "analytic_gaussian_sigma": "privacy.ldp",
    "make_mechanism": "privacy.ldp",
    "align": "core.matching",
    "match_many": "core.matching",
    "weight_matching": "core.matching",
    "MLP": "core.models",
    "SmallCNN": "core.models",
    "PermutationSpec": "core.spec",
    "apply_perms": "core.spec",
    "spec_for": "core.spec",
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
