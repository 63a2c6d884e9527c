"""Predictors: one interface over a PyTorch checkpoint or an ONNX Runtime session.

Both turn a picture into model input exactly as training does (:func:`data.images.load_rgb`,
:func:`data.images.resize_rgb` to ``meta["input_size"]``, :func:`data.transforms.to_float_nchw`
with ``meta["mean"]``/``meta["std"]``) and return softmax probabilities in ``meta["classes"]``
order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.images import load_rgb, resize_rgb
from skin_lesion_classifier.data.transforms import to_float_nchw
from skin_lesion_classifier.inference.decision import Decision, decision_from_meta
from skin_lesion_classifier.inference.predict import predict_proba

#: Key of the ONNX ``metadata_props`` entry that carries the checkpoint meta as JSON.
ONNX_META_KEY = "skin_lesion_classifier.meta"

_REQUIRED_META = ("classes", "input_size", "mean", "std")


def check_meta(meta: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate the parts of a checkpoint ``meta`` that inference needs; return a copy."""
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(
            f"{source}: model meta lacks {missing} (see the checkpoint contract)"
        )
    meta = dict(meta)
    h, w = (int(v) for v in meta["input_size"])
    meta["input_size"] = [h, w]
    if len(meta["mean"]) != 3 or len(meta["std"]) != 3:
        raise ValueError(f"{source}: meta mean/std must have 3 values each")
    classes = list(meta["classes"])
    if classes != list(CLASSES):
        raise ValueError(
            f"{source}: meta classes {classes} are not {list(CLASSES)} in that order"
        )
    meta["classes"] = classes
    return meta


def file_digest(path: str | os.PathLike, length: int = 12) -> str:
    """The first ``length`` hex digits of the file's sha256, a content-based version tag."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


class Predictor:
    """Common interface: ``predict(uint8 NHWC) -> (N, C)`` probabilities plus the model meta.

    Attributes: ``backend`` (``"torch"`` or ``"onnx"``), ``meta`` (checkpoint meta),
    ``version`` (a tag naming the model: registry name/version, run id or file digest),
    ``source`` (where it was loaded from) and ``torch_model`` (the ``nn.Module`` when one is
    available, needed by Grad-CAM).
    """

    backend: str = "?"

    def __init__(
        self, meta: Mapping[str, Any], source: str, version: str | None = None
    ):
        self.meta = check_meta(meta, source)
        self.source = source
        self.version = version or Path(source).name
        self.decision: Decision = decision_from_meta(self.meta)
        self.torch_model: torch.nn.Module | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.meta["input_size"]
        return int(h), int(w)

    def use_decision(self, decision: Mapping[str, Any], source: str) -> None:
        """Replace the decision rule (e.g. with evaluation's ``decision_rule.json``)."""
        self.meta["decision"] = dict(decision)
        self.decision = decision_from_meta(self.meta, source=source)

    def prepare(
        self, source: str | os.PathLike | bytes, name: str | None = None
    ) -> np.ndarray:
        """Decode ``source`` and resize it to the model's input size: ``(H, W, 3)`` uint8.

        Raises :class:`data.images.ImageDecodeError` naming ``name`` for unreadable input.
        """
        return resize_rgb(load_rgb(source, name=name), self.input_size)

    def predict(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_one(
        self, source: str | os.PathLike | bytes, name: str | None = None
    ) -> np.ndarray:
        """Probabilities ``(C,)`` for one picture (path or bytes)."""
        return self.predict(self.prepare(source, name)[None])[0]

    def describe(self) -> dict[str, Any]:
        """What the model is: for ``GET /model`` and logs."""
        m = self.meta
        return {
            "backend": self.backend,
            "version": self.version,
            "source": self.source,
            "arch": m.get("arch"),
            "classes": self.classes,
            "input_size": list(self.input_size),
            "mean": list(m["mean"]),
            "std": list(m["std"]),
            "uses_metadata": bool(m.get("uses_metadata", False)),
            "decision": self.decision.as_dict(),
            "metrics": m.get("metrics") or {},
            "explainable": self.torch_model is not None,
        }


def _check_no_metadata(meta: Mapping[str, Any], source: str) -> None:
    if meta.get("uses_metadata"):
        raise ValueError(
            f"{source}: this model fuses patient metadata (uses_metadata=True); the image-only "
            "predictor cannot feed it. Serve an image-only model."
        )


class TorchPredictor(Predictor):
    """A PyTorch model in eval mode on ``device``, with optional test-time augmentation."""

    backend = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        meta: Mapping[str, Any],
        source: str = "<in-memory>",
        version: str | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
        tta: bool | Sequence[str] | None = False,
    ):
        super().__init__(meta, source, version)
        _check_no_metadata(self.meta, source)
        self.device = torch.device(device)
        self.torch_model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.tta = tta

    def predict(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return predict_proba(
            self.torch_model,
            images,
            self.meta["mean"],
            self.meta["std"],
            device=self.device,
            batch_size=self.batch_size,
            tta=self.tta,
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: torch.device | str = "cpu", **kwargs: Any
    ) -> TorchPredictor:
        """Load a checkpoint with :func:`models.checkpoint.load_model` (no network access)."""
        from skin_lesion_classifier.models.checkpoint import load_model

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"model checkpoint not found: {path} (train first: make quick-train)"
            )
        model, meta = load_model(path, device)
        kwargs.setdefault("version", f"{path.name}@sha256:{file_digest(path)}")
        return cls(model, meta, source=str(path), device=device, **kwargs)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax ``exp(z - max z) / sum exp(z - max z)``, in float64 then float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class OnnxPredictor(Predictor):
    """An ONNX Runtime CPU session over a model exported by :func:`inference.onnx.export_onnx`.

    The checkpoint meta travels inside the ``.onnx`` file (``metadata_props``), so the file
    alone is enough to serve. ``torch_model`` may be attached to enable Grad-CAM.
    """

    backend = "onnx"

    def __init__(
        self,
        path: str | os.PathLike,
        meta: Mapping[str, Any] | None = None,
        version: str | None = None,
        batch_size: int = 32,
        threads: int = 0,
    ):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"ONNX model not found: {path} (export one: skin-lesion-classifier export-onnx)"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: not a loadable ONNX model ({exc})") from exc
        if meta is None:
            meta = read_onnx_meta(self.session, str(path))
        super().__init__(
            meta, str(path), version or f"{path.name}@sha256:{file_digest(path)}"
        )
        _check_no_metadata(self.meta, str(path))
        self.input_name = self.session.get_inputs()[0].name
        self.batch_size = int(batch_size)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = to_float_nchw(
                images[start : start + self.batch_size],
                self.meta["mean"],
                self.meta["std"],
            )
            out.append(softmax(self.logits(x.numpy())))
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(out)


def read_onnx_meta(session: Any, source: str) -> dict[str, Any]:
    """The checkpoint meta stored in an ONNX file's ``metadata_props``."""
    props = session.get_modelmeta().custom_metadata_map
    if ONNX_META_KEY not in props:
        raise ValueError(
            f"{source}: ONNX file has no {ONNX_META_KEY!r} metadata; export it with "
            "`skin-lesion-classifier export-onnx` so it carries classes, input size and normalisation"
        )
    return json.loads(props[ONNX_META_KEY])


#: The file evaluation writes beside the model (``data/06_models/decision_rule.json``).
DECISION_FILE = "decision_rule.json"


def read_decision_file(path: str | os.PathLike) -> dict[str, Any]:
    """A decision rule JSON (evaluation's ``decision_rule`` catalog entry)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decision rule file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: a decision rule is a JSON object, got {type(data).__name__}"
        )
    return data


def attach_decision(
    predictor: Predictor,
    model_path: str | os.PathLike,
    decision_file: str | os.PathLike | None = None,
) -> Predictor:
    """Give ``predictor`` its validated decision rule.

    An explicit ``decision_file`` always wins. Otherwise the checkpoint meta's ``decision``
    is used, and when the meta has none, ``decision_rule.json`` beside the model file (what
    the evaluation pipeline writes) if it exists.
    """
    if decision_file is not None:
        predictor.use_decision(
            read_decision_file(decision_file), source=str(decision_file)
        )
    elif not predictor.meta.get("decision"):
        beside = Path(model_path).with_name(DECISION_FILE)
        if beside.is_file():
            predictor.use_decision(read_decision_file(beside), source=str(beside))
    return predictor


def load_predictor(
    path: str | os.PathLike,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    torch_checkpoint: str | os.PathLike | None = None,
    decision_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Predictor:
    """Load a local model file: a ``.pt`` checkpoint or an ``.onnx`` export.

    ``backend="auto"`` follows the suffix; ``"onnx"`` with a ``.pt`` file is an error (export
    first). For an ONNX model, ``torch_checkpoint`` (when given) is loaded too so that
    Grad-CAM works. The decision rule comes from :func:`attach_decision`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path} (train first: make quick-train)")
    is_onnx = path.suffix.lower() == ".onnx"
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"backend must be auto, torch or onnx, got {backend!r}")
    if backend == "torch" and is_onnx:
        raise ValueError(
            f"{path}: an ONNX file cannot be served with the torch backend"
        )
    if backend == "onnx" and not is_onnx:
        raise ValueError(
            f"{path}: the onnx backend needs an .onnx file; export one with "
            "`skin-lesion-classifier export-onnx --model {path}`"
        )
    if is_onnx:
        pred = OnnxPredictor(
            path,
            batch_size=kwargs.get("batch_size", 32),
            threads=kwargs.get("threads", 0),
        )
        if torch_checkpoint is not None:
            tp = TorchPredictor.from_checkpoint(torch_checkpoint, device=device)
            pred.torch_model = tp.torch_model
        return attach_decision(pred, path, decision_file)
    kwargs.pop("threads", None)
    return attach_decision(
        TorchPredictor.from_checkpoint(path, device=device, **kwargs),
        path,
        decision_file,
    )
