"""`pluribus demo`: U2QT tokens -> GGSM encoder -> FedBone across institutions -> PrivFusion, one report."""

from pluribus.demo.runner import STEP_NAMES, DemoConfig, DemoContext, StepResult, run_demo

__all__ = ["STEP_NAMES", "DemoConfig", "DemoContext", "StepResult", "run_demo"]
