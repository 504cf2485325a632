"""PrivFusion (a reconstruction from the paper's abstract): LDP model fusion by neuron matching + adapter.

Flower is imported only by :mod:`pluribus.fusion.exchange`, lazily.
"""

from pluribus.fusion.accounting import PrivacyLedger, Release, privacy_report, privacy_report_markdown
from pluribus.fusion.adapter import AdaptedModel, fit_adapter
from pluribus.fusion.config import AdapterConfig, FusionConfig, RunConfig
from pluribus.fusion.descriptors import PartyRelease, release_party
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
from pluribus.fusion.spec import PermutationSpec, apply_perms, spec_for

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "DuchiMechanism",
    "FusionConfig",
    "FusionResult",
    "GaussianMechanism",
    "HybridMechanism",
    "LaplaceMechanism",
    "MLP",
    "Mechanism",
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
    "make_mechanism",
    "match_many",
    "privacy_report",
    "privacy_report_markdown",
    "privfusion",
    "release_party",
    "spec_for",
    "weight_matching",
]
