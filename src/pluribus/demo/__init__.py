"""`pluribus demo`: U2QT tokens -> GGSM encoder -> FedBone across institutions -> PrivFusion, one report."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluribus.demo.steps import STEP_NAMES
from pluribus.lazy import lazy_getattr

if TYPE_CHECKING:
    from pluribus.demo.runner import DemoConfig, DemoContext, StepResult, run_demo

_EXPORTS = {"DemoConfig": "runner", "DemoContext": "runner", "StepResult": "runner", "run_demo": "runner"}

__getattr__ = lazy_getattr("pluribus.demo", _EXPORTS)

__all__ = ["STEP_NAMES", "DemoConfig", "DemoContext", "StepResult", "run_demo"]
