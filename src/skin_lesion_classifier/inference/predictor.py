"""Predictors: one interface over a PyTorch checkpoint or an ONNX Runtime session.

Both turn a picture into model input exactly as training does (:func:`data.images.load_rgb`,
:func:`data.images.resize_rgb` to ``meta["input_size"]``, :func:`data.transforms.to_float_nchw`
with ``meta["mean"]``/``meta["std"]``) and return softmax probabilities in ``meta["classes"]``
order.

Models that fuse patient metadata (``meta["uses_metadata"]``; single fusion models and
ensembles with a fusion member) are fed the vector of the checkpoint's own
``metadata_encoder`` (:class:`data.metadata_features.MetadataEncoder`): ``predict(images,
metadata)`` takes the patients' ``age, sex, localization`` (a data frame, one mapping for
every image, or an already encoded array); any of them may be missing, and no metadata at
all means every field unknown, which the encoder represents explicitly (``age_missing``,
``sex_unknown``, ``site_unknown``). Image-only models ignore metadata
(:attr:`Predictor.uses_metadata` tells callers, who say so).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.images import (
    MAX_PIXELS,
    load_resized,
    load_rgb,
    resize_rgb,
)
from skin_lesion_classifier.data.metadata_features import (
    METADATA_COLUMNS,
    OTHER_SITE,
    UNKNOWN_SITE,
    MetadataEncoder,
)
from skin_lesion_classifier.data.transforms import to_float_nchw
from skin_lesion_classifier.inference.decision import Decision, decision_from_meta
from skin_lesion_classifier.inference.predict import predict_proba
from skin_lesion_classifier.inference.versions import (
    paired_version,
    version_of,
    weights_digest,
)

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


def metadata_encoder_of(meta: Mapping[str, Any], source: str) -> MetadataEncoder | None:
    """The metadata encoder of a fusion model's meta (``None`` for an image-only model);
    raises naming ``source`` when a fusion model's meta lacks a usable encoder."""
    if not meta.get("uses_metadata"):
        return None
    data = meta.get("metadata_encoder")
    if not data:
        raise ValueError(
            f"{source}: this model fuses patient metadata (uses_metadata=True) but its meta "
            "has no metadata_encoder, so age / sex / site cannot be encoded as in training; "
            "save the checkpoint with the encoder fitted on its training rows"
        )
    try:
        enc = MetadataEncoder.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from exc
    dim = (meta.get("model_kwargs") or {}).get("metadata_dim")
    if dim is not None and int(dim) != enc.dim:
        raise ValueError(
            f"{source}: the metadata encoder gives {enc.dim} features but the model takes "
            f"metadata_dim={dim}"
        )
    return enc


def unknown_metadata(n: int) -> pd.DataFrame:
    """``n`` rows of ``age, sex, localization`` all unknown (blank)."""
    return pd.DataFrame({c: [None] * n for c in METADATA_COLUMNS}, dtype=object)


def ensemble_info(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """Members and weights of an ensemble checkpoint's meta (``None`` for a single model):
    ``{"members": [{name, arch, weight, input_size, uses_metadata, kept}], "objective"}``."""
    mk = meta.get("model_kwargs") or {}
    listed = (meta.get("ensemble") or {}).get("members")
    if listed is None and not mk.get("members"):
        return None
    if listed is None:
        listed = [
            {
                "name": m.get("name", f"member_{i}"),
                "arch": m.get("arch"),
                "weight": float(m.get("weight", 0.0)),
                "input_size": list(m.get("input_size", [])),
                "uses_metadata": bool(m.get("uses_metadata", False)),
                "kept": True,
            }
            for i, m in enumerate(mk["members"])
        ]
    fit = (meta.get("ensemble") or {}).get("weights_fit") or {}
    return {
        "members": [dict(m) for m in listed],
        "objective": fit.get("objective"),
    }


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
        self.metadata_encoder: MetadataEncoder | None = metadata_encoder_of(
            self.meta, source
        )

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
        self,
        source: str | os.PathLike | bytes,
        name: str | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> np.ndarray:
        """Decode ``source`` and resize it to the model's input size: ``(H, W, 3)`` uint8.

        Raises :class:`data.images.ImageDecodeError` naming ``name`` for unreadable input
        (:class:`data.images.ImageTooLarge` above ``max_pixels``, before decoding).
        """
        return resize_rgb(
            load_rgb(source, name=name, max_pixels=max_pixels), self.input_size
        )

    @property
    def uses_metadata(self) -> bool:
        """Whether the model fuses patient metadata (age, sex, localization)."""
        return self.metadata_encoder is not None

    def encode_metadata(self, metadata: Any, n: int) -> np.ndarray | None:
        """The model's metadata input ``(n, D)`` float32, ``None`` for an image-only model.

        ``metadata`` is ``None`` (every field unknown), a mapping with any of ``age``,
        ``sex``, ``localization`` (one patient, used for all ``n`` images), a data frame of
        ``n`` rows with those columns, or an already encoded ``(n, D)`` array. Blank /
        ``None`` values are unknown; impossible values raise ``ValueError`` naming them.
        """
        enc = self.metadata_encoder
        if enc is None:
            return None
        if metadata is None:
            return enc.transform(unknown_metadata(n))
        if isinstance(metadata, Mapping):
            extra = sorted(set(metadata) - set(METADATA_COLUMNS))
            if extra:
                raise ValueError(
                    f"unknown metadata field(s) {extra}; expected {list(METADATA_COLUMNS)}"
                )
            row = {c: metadata.get(c) for c in METADATA_COLUMNS}
            return enc.transform(pd.DataFrame([row] * n, dtype=object))
        if isinstance(metadata, pd.DataFrame):
            if len(metadata) != n:
                raise ValueError(f"{n} images but {len(metadata)} metadata rows")
            return enc.transform(metadata)
        x = np.asarray(metadata, dtype=np.float32)
        if x.shape != (n, enc.dim):
            raise ValueError(
                f"encoded metadata must have shape ({n}, {enc.dim}), got {x.shape}"
            )
        return x

    def describe_metadata(self, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        """How one patient's metadata is read by this model: the cleaned values, which
        fields count as unknown, the site bucket the encoder uses and a note."""
        from skin_lesion_classifier.data.metadata_features import (
            parse_age,
            parse_sex,
            parse_site,
        )

        frame = pd.DataFrame(
            [{c: (metadata or {}).get(c) for c in METADATA_COLUMNS}], dtype=object
        )
        age = float(parse_age(frame)[0])
        sex = str(parse_sex(frame)[0])
        site = str(parse_site(frame)[0])
        unknown = [
            name
            for name, missing in (
                ("age", not np.isfinite(age)),
                ("sex", sex == "unknown"),
                ("localization", site == UNKNOWN_SITE),
            )
            if missing
        ]
        out: dict[str, Any] = {
            "used": self.uses_metadata,
            "age": age if np.isfinite(age) else None,
            "sex": sex,
            "localization": None if site == UNKNOWN_SITE else site,
            "localization_bucket": None,
            "unknown": unknown,
        }
        if self.metadata_encoder is None:
            given = [c for c in METADATA_COLUMNS if c not in unknown]
            out["note"] = "this model is image-only: patient metadata is not used" + (
                f" ({', '.join(given)} ignored)" if given else ""
            )
            return out
        bucket = str(self.metadata_encoder.site_bucket([site])[0])
        out["localization_bucket"] = bucket
        notes = []
        if unknown:
            notes.append(f"{', '.join(unknown)} unknown to the model")
        if bucket == OTHER_SITE:
            notes.append(
                f"localization {site!r} was rare or unseen in training: encoded as 'other'"
            )
        out["note"] = "; ".join(notes) or "all patient fields used"
        return out

    def predict(self, images: np.ndarray, metadata: Any = None) -> np.ndarray:
        """Probabilities ``(N, C)`` for ``(N, H, W, 3)`` uint8 images at the model size;
        ``metadata`` as in :meth:`encode_metadata` (ignored by image-only models)."""
        extra = self.encode_metadata(metadata, len(images))
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return self._predict(images, extra)

    def _predict(self, images: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def predict_one(
        self,
        source: str | os.PathLike | bytes,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        """Probabilities ``(C,)`` for one picture (path or bytes) and, for a fusion model,
        its patient's ``age`` / ``sex`` / ``localization`` (any may be missing)."""
        return self.predict(self.prepare(source, name)[None], metadata)[0]

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
            "uses_metadata": self.uses_metadata,
            "metadata_fields": list(METADATA_COLUMNS) if self.uses_metadata else [],
            "metadata_sites": (
                [
                    s
                    for s in self.metadata_encoder.sites
                    if s not in (UNKNOWN_SITE, OTHER_SITE)
                ]
                if self.metadata_encoder is not None
                else []
            ),
            "ensemble": ensemble_info(m),
            "decision": self.decision.as_dict(),
            "metrics": m.get("metrics") or {},
            "explainable": self.torch_model is not None,
        }


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
        self.device = torch.device(device)
        self.torch_model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.tta = tta

    def _predict(self, images: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        return predict_proba(
            self.torch_model,
            images,
            self.meta["mean"],
            self.meta["std"],
            device=self.device,
            batch_size=self.batch_size,
            tta=self.tta,
            extra_inputs=extra,
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | Mapping[str, Any],
        device: torch.device | str = "cpu",
        **kwargs: Any,
    ) -> TorchPredictor:
        """Load a checkpoint file, or take a checkpoint dict (what the catalog's
        ``TorchCheckpointDataset`` loads), with :func:`models.checkpoint.load_model`
        (no network access)."""
        from skin_lesion_classifier.models.checkpoint import load_model

        if isinstance(path, Mapping):
            model, meta = load_model(path, device)
            kwargs.setdefault("source", "<checkpoint>")
            return cls(model, meta, device=device, **kwargs)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"model checkpoint not found: {path} (train first: make quick-train)"
            )
        model, meta = load_model(path, device)
        kwargs.setdefault("version", f"{path.name}@sha256:{file_digest(path)}")
        return cls(model, meta, source=str(path), device=device, **kwargs)


def images_for(
    images: Any, image_ids: Sequence[str], size: Sequence[int]
) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 model input of ``image_ids`` at ``size``: taken from a uint8
    image cache at that size (it has ``take`` and ``input_size``), else decoded from the
    ``path`` column of an ``image_index`` frame and resized as in training."""
    size = (int(size[0]), int(size[1]))
    image_ids = list(image_ids)
    if hasattr(images, "take") and hasattr(images, "input_size"):
        if tuple(images.input_size) == size:
            return images.take(image_ids)
        raise ValueError(
            f"the image cache is at {tuple(images.input_size)} but the model wants {size}; "
            "rebuild the cache or predict from image_index"
        )
    if not isinstance(images, pd.DataFrame) or "path" not in images.columns:
        raise ValueError(
            "images must be an image cache or an image_index frame with 'path'"
        )
    paths = images.drop_duplicates("image_id").set_index("image_id")["path"]
    missing = [i for i in image_ids if i not in paths.index]
    if missing:
        raise ValueError(
            f"{len(missing)} images are not in image_index (first: {missing[:5]})"
        )
    if not image_ids:
        return np.zeros((0, *size, 3), dtype=np.uint8)
    return np.stack([load_resized(paths[i], size) for i in image_ids])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax ``exp(z - max z) / sum exp(z - max z)``, in float64 then float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class OnnxPredictor(Predictor):
    """An ONNX Runtime CPU session over a model exported by :func:`inference.onnx.export_onnx`.

    The checkpoint meta travels inside the ``.onnx`` file (``metadata_props``), so the file
    alone is enough to serve. A fusion model's graph has a second input ``metadata``
    ``(batch, D)``. ``torch_model`` may be attached to enable Grad-CAM.
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
        inputs = [i.name for i in self.session.get_inputs()]
        self.input_name = inputs[0]
        self.metadata_input: str | None = None
        if self.uses_metadata:
            if len(inputs) != 2:
                raise ValueError(
                    f"{path}: the model fuses patient metadata but the ONNX graph has "
                    f"inputs {inputs}, not (images, metadata); re-export it with "
                    "`skin-lesion-classifier export-onnx`"
                )
            self.metadata_input = inputs[1]
        elif len(inputs) != 1:
            raise ValueError(
                f"{path}: an image-only model's graph should have one input, got {inputs}"
            )
        self.batch_size = int(batch_size)

    def logits(self, x: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        feed = {self.input_name: x}
        if self.metadata_input is not None:
            if metadata is None:
                raise ValueError("this ONNX model needs its metadata input")
            feed[self.metadata_input] = np.asarray(metadata, dtype=np.float32)
        return self.session.run(None, feed)[0]

    def _predict(self, images: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = to_float_nchw(
                images[start : start + self.batch_size],
                self.meta["mean"],
                self.meta["std"],
            )
            m = None if extra is None else extra[start : start + self.batch_size]
            out.append(softmax(self.logits(x.numpy(), m)))
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


def _weights_digest_beside(model_path: Path) -> str | None:
    """:func:`weights_digest` of the ``.pt`` checkpoint at (or, for an ONNX export, in the
    same version folder as) ``model_path``; ``None`` when there is none."""
    found = [model_path] if model_path.suffix == ".pt" else []
    found = found or sorted(model_path.parent.glob("*.pt"))
    if not found:
        return None
    from skin_lesion_classifier.models.checkpoint import read_checkpoint

    return weights_digest(read_checkpoint(found[0])["state_dict"])


def attach_decision(
    predictor: Predictor,
    model_path: str | os.PathLike,
    decision_file: str | os.PathLike | None = None,
) -> Predictor:
    """Give ``predictor`` its validated decision rule.

    An explicit ``decision_file`` always wins. Otherwise the checkpoint meta's ``decision``
    is used, and when the meta has none, ``decision_rule.json`` beside the model file (what
    the evaluation pipeline writes) if it exists; for a model inside a versioned folder
    (``model.pt/<version>/model.pt``), the decision-rule version evaluated for it
    (:func:`inference.versions.paired_version`).
    """
    if decision_file is not None:
        predictor.use_decision(
            read_decision_file(decision_file), source=str(decision_file)
        )
    elif not predictor.meta.get("decision"):
        beside = Path(model_path).with_name(DECISION_FILE)
        if not beside.is_file() and version_of(model_path) is not None:
            digest = _weights_digest_beside(Path(model_path))
            beside = paired_version(model_path, DECISION_FILE, digest) or beside
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
            f"`skin-lesion-classifier export-onnx --model {path}`"
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
