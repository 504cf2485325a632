"""The demo's steps in chain order (light: `pluribus --help` lists them without importing torch)."""

from __future__ import annotations

# step -> (module, function); a module is imported only when its step runs, so a run of the early steps
# does not load transformers or Flower.
STEP_FUNCTIONS = {
    "data": ("pluribus.demo.basic", "step_data"),
    "baseline": ("pluribus.demo.basic", "step_baseline"),
    "tokenize": ("pluribus.demo.tokenize", "step_tokenize"),
    "encode": ("pluribus.demo.encode", "step_encode"),
    "federate": ("pluribus.demo.federate", "step_federate"),
    "fuse": ("pluribus.demo.fuse", "step_fuse"),
}
STEP_NAMES = tuple(STEP_FUNCTIONS)
