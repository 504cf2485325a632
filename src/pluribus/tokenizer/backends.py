"""Faster stage-1 runtimes on CPU for a sentence-transformers model: ONNX Runtime (float32, dynamic int8) and
OpenVINO (float32, bfloat16).

Why not sentence-transformers' own ``backend="onnx"|"openvino"``: it loads through Optimum, and no Optimum
release on the package index supports the installed transformers 5.x (optimum-onnx 0.1.0 needs
transformers<4.58; optimum-intel 2.2.0 needs transformers<5.6 and huggingface-hub<1.22, and fails to import with
transformers 5.24). So the steps Optimum would take are done here with the runtimes directly, and nothing else
changes: sentence-transformers still tokenises (its truncation, its max_seq_length) and pools (the model's own
modules after the transformer); only the transformer's forward runs in another engine.

- The transformer is exported once per model (eager attention, so ONNX Runtime's BERT fusions apply) into
  ``$PLURIBUS_DATA_DIR/models/<model>-<digest>/<artifact>/``; each artifact is written into a temporary folder
  and renamed into place, so an interrupted export leaves nothing half-written and the next load redoes only
  what is missing. The packaged model folder may be read-only: it is only read.
- ``onnx``: ONNX Runtime's BERT graph fusions (attention, layer norms, GELU) on the float32 export.
- ``onnx-int8``: ONNX Runtime dynamic quantisation of the float32 export: int8 weights per output channel, only
  the weight MatMuls (the activation-activation MatMuls of attention stay float32: quantising them cost accuracy,
  cosine 0.92 in a first try).
- ``openvino`` / ``openvino-bf16``: OpenVINO's conversion of the torch transformer, run in float32 or with the
  bfloat16 precision hint (needs a CPU with bf16 instructions: AVX512-BF16 or AMX; refused otherwise).

A backend is checked to be in effect after loading (the ONNX Runtime provider and, for int8, the quantised
MatMul nodes; OpenVINO's reported inference precision): :attr:`RuntimeEncoder.in_effect` says what runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pluribus.errors import ConfigError
from pluribus.tokenizer.config import EMBED_BACKENDS

#: The packages each runtime backend needs (all in the ``embed`` extra).
PACKAGES = {
    "onnx": ("onnxruntime", "onnx"),
    "onnx-int8": ("onnxruntime", "onnx"),
    "openvino": ("openvino",),
    "openvino-bf16": ("openvino",),
}
#: Bump when the export recipe changes (a new folder, so old exports are never reused for new settings).
EXPORT_VERSION = 1
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_INT8_OPS = ("MatMulInteger", "DynamicQuantizeMatMul")
_ORT_FUSED_OPS = ("Attention", "MultiHeadAttention")


def require_backend(backend: str) -> None:
    """ConfigError naming the backend and what to install when its packages are missing."""
    missing = [p for p in PACKAGES.get(backend, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"embed backend {backend!r} needs {', '.join(missing)}, which is not installed: "
                          "pip install 'pluribus[embed]'")


def backend_available(backend: str) -> bool:
    """Whether this machine can run ``backend``: its packages are installed and, for ``openvino-bf16``, the CPU
    has bf16 instructions (OpenVINO's ``OPTIMIZATION_CAPABILITIES``). Loading still checks it is in effect."""
    if backend == "torch":
        return True
    if backend not in PACKAGES or any(importlib.util.find_spec(p) is None for p in PACKAGES[backend]):
        return False
    if backend == "openvino-bf16":
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return True


def export_root(model_path: str | Path) -> Path:
    """The export folder of one model: its name plus a digest of its resolved path and of the name, size and
    modification time of its config and weight files (subfolders too: a legacy ``0_Transformer/`` layout).

    Name and size alone are the same for two fine-tunes of one model (``runs/a/model``, ``runs/b/model``) and for
    a fine-tune saved over the model: the second would run the first's export. Stat only: hashing the weights
    would read the whole model in every worker."""
    from pluribus.data.locate import data_home

    path = Path(model_path)
    h = hashlib.sha256(f"v{EXPORT_VERSION}\x1f{path.resolve() if path.exists() else model_path}".encode())
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            rel = file.relative_to(path)
            if file.suffix in (".json", ".safetensors", ".bin") and not any(p.startswith(".") for p in rel.parts):
                st = file.stat()
                h.update(f"\x1f{rel.as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return data_home() / "models" / f"{path.name}-{h.hexdigest()[:12]}"


def _artifact(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """``root/name``, built by ``build(tmp_folder)`` into a temporary folder and renamed into place when missing."""
    target = root / name
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same export first: keep its copy
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class _LastHidden(torch.nn.Module):
    """The transformer as a function of its three inputs, returning the token embeddings."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> Any:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state


def transformer_of(model: Any, model_path: str, backend: str) -> Any:
    """The loaded model's transformer (its first module's ``auto_model``): what is exported, so the export has
    the weights sentence-transformers loaded wherever they sit (a legacy ``0_Transformer/`` folder too); a model
    that does not start with a transformer is refused."""
    backbone = getattr(model[0], "auto_model", None)
    if not isinstance(backbone, torch.nn.Module):
        raise ConfigError(f"embed backend {backend!r} runs the transformer of a sentence-transformers model; "
                          f"{model_path} starts with {type(model[0]).__name__}: use backend='torch'")
    return backbone


def _eager_backbone(model: Any) -> torch.nn.Module:
    """The model's transformer with eager attention (the graph ONNX Runtime's fusions recognise). The runtime's
    model is its own (``runtime_encoder`` loads it), and only its modules after the transformer run later."""
    backbone = model[0].auto_model
    backbone.set_attn_implementation("eager")
    return _LastHidden(backbone.eval())


def _example(model: Any) -> dict[str, torch.Tensor]:
    enc = model.preprocess(["an example text to trace", "another one"])  # its tokeniser, padded
    if "token_type_ids" not in enc:
        enc["token_type_ids"] = torch.zeros_like(enc["input_ids"])
    return {k: enc[k] for k in _INPUTS}


def _export_onnx(model: Any, root: Path) -> Path:
    def build(tmp: Path) -> None:
        example = _example(model)
        with torch.no_grad():
            torch.onnx.export(_eager_backbone(model), tuple(example[k] for k in _INPUTS), str(tmp / "model.onnx"),
                              input_names=list(_INPUTS), output_names=["last_hidden_state"],
                              dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*_INPUTS, "last_hidden_state"]},
                              opset_version=17, dynamo=False)

    return _artifact(root, "onnx-export", build) / "model.onnx"


def onnx_file(model: Any, model_path: str, backend: str) -> Path:
    """The ONNX file of ``backend`` (``onnx`` fused float32, ``onnx-int8`` dynamic int8) of the loaded
    sentence-transformers ``model`` (from ``model_path``), exported when missing."""
    import onnx

    root = export_root(model_path)
    plain = _export_onnx(model, root)
    if backend == "onnx":
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = transformer_of(model, model_path, backend).config
        heads, hidden = int(cfg.num_attention_heads), int(cfg.hidden_size)

        def fuse(tmp: Path) -> None:
            optimize_model(str(plain), model_type="bert", num_heads=heads, hidden_size=hidden,
                           opt_level=1).save_model_to_file(str(tmp / "model.onnx"))

        return _artifact(root, "onnx-fused", fuse) / "model.onnx"

    from onnxruntime.quantization import QuantType, quantize_dynamic

    def quantise(tmp: Path) -> None:
        quantize_dynamic(str(plain), str(tmp / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})

    return _artifact(root, "onnx-int8", quantise) / "model.onnx"


def openvino_file(model: Any, model_path: str) -> Path:
    """The OpenVINO IR (``model.xml`` + ``.bin``) of the loaded model's transformer, converted when missing."""
    import openvino as ov

    def build(tmp: Path) -> None:
        example = _example(model)
        with torch.no_grad():
            converted = ov.convert_model(_eager_backbone(model), example_input=example)
        ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=False)

    return _artifact(export_root(model_path), "openvino", build) / "model.xml"


def _onnx_ops(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class RuntimeEncoder:
    """A sentence-transformers model whose transformer runs in ONNX Runtime or OpenVINO.

    ``model`` (the torch SentenceTransformer) tokenises and pools; ``run(features)`` gives the token embeddings.
    """

    def __init__(self, model: Any, model_path: str, backend: str, threads: int) -> None:
        if backend not in PACKAGES:
            raise ConfigError(f"embed backend {backend!r} is not one of {list(EMBED_BACKENDS)}")
        require_backend(backend)
        transformer_of(model, model_path, backend)
        self.model, self.backend = model, backend
        self.input_names: list[str] = []
        self.run: Callable[[dict[str, np.ndarray]], np.ndarray]
        if backend.startswith("onnx"):
            self._load_onnx(model_path, backend, threads)
        else:
            self._load_openvino(model_path, backend, threads)

    def _load_onnx(self, model_path: str, backend: str, threads: int) -> None:
        import onnxruntime as ort

        path = onnx_file(self.model, model_path, backend)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = _onnx_ops(path)
        int8 = sum(ops.get(op, 0) for op in _INT8_OPS)
        fused = sum(ops.get(op, 0) for op in _ORT_FUSED_OPS)
        # in effect, not assumed: the CPU provider runs, and the graph is the quantised / fused one we asked for
        if session.get_providers()[0] != "CPUExecutionProvider":
            raise ConfigError(f"embed backend {backend!r}: ONNX Runtime runs {session.get_providers()[0]}, "
                              "expected CPUExecutionProvider")
        if backend == "onnx-int8" and int8 == 0:
            raise ConfigError(f"embed backend 'onnx-int8': {path} has no int8 MatMul (export failed to quantise); "
                              "delete the folder to re-export")
        self.input_names = [i.name for i in session.get_inputs()]
        self.in_effect = (f"onnxruntime {ort.__version__} CPUExecutionProvider, {path.parent.name}: "
                          f"{int8} int8 MatMul, {fused} fused attention nodes")
        self.path = path

        def run(feed: dict[str, np.ndarray]) -> np.ndarray:
            return np.asarray(session.run(None, feed)[0])

        self.run = run

    def _load_openvino(self, model_path: str, backend: str, threads: int) -> None:
        import openvino as ov

        path = openvino_file(self.model, model_path)
        want = "bf16" if backend == "openvino-bf16" else "f32"
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                              "INFERENCE_PRECISION_HINT": want})
        got = compiled.get_property("INFERENCE_PRECISION_HINT")
        expected = ov.Type.bf16 if want == "bf16" else ov.Type.f32
        if got != expected:  # OpenVINO falls back to f32 on a CPU without bf16: say so, do not assume
            raise ConfigError(f"embed backend {backend!r}: OpenVINO runs in {got.get_type_name()} on this CPU, not "
                              f"{expected.get_type_name()} (no bf16 instructions); use 'openvino' or 'onnx-int8'")
        self.input_names = [next(iter(p.get_names())) for p in compiled.inputs]
        self.in_effect = f"openvino {ov.__version__} CPU, inference precision {got.get_type_name()}"
        self.path = path
        request = compiled.create_infer_request()

        def run(feed: dict[str, np.ndarray]) -> np.ndarray:
            return np.asarray(request.infer(feed)[compiled.output(0)])

        self.run = run

    def encode(self, texts: Sequence[str], *, batch_size: int, normalize: bool) -> np.ndarray:
        """float32 ``[len(texts), dim]``, in batches of similar length (as sentence-transformers sorts them), with
        the model's default prompt as its ``encode`` prepends it."""
        name = self.model.default_prompt_name
        prompt = self.model.prompts.get(name) if name is not None else None
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), 0), dtype=np.float32)
        parts = []
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            features = self.model.preprocess(batch, prompt=prompt)
            if "token_type_ids" not in features:
                features["token_type_ids"] = torch.zeros_like(features["input_ids"])
            feed = {name: features[name].numpy().astype(np.int64) for name in self.input_names}
            hidden = torch.from_numpy(self.run(feed).astype(np.float32, copy=False))
            # every feature goes on, as in sentence-transformers (prompt_length: pooling without the prompt)
            pooled: dict[str, Any] = {**features, "token_embeddings": hidden}
            with torch.no_grad():
                for module in list(self.model)[1:]:  # the model's own pooling (and Normalize, if it has one)
                    pooled = module(pooled)
                vecs = pooled["sentence_embedding"]
                if normalize:
                    vecs = torch.nn.functional.normalize(vecs, p=2, dim=1)
            parts.append(vecs.float().numpy())
        if parts:
            out = np.concatenate(parts)
        result = np.empty_like(out)
        result[order] = out
        return result


@functools.lru_cache(maxsize=4)
def runtime_encoder(model_path: str, backend: str, threads: int) -> RuntimeEncoder:
    """One loaded runtime per model, backend and thread count (per-shard stage 1 calls the embedder many times)."""
    from sentence_transformers import SentenceTransformer

    return RuntimeEncoder(SentenceTransformer(model_path, device="cpu"), model_path, backend, threads)
