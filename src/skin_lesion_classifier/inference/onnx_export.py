"""ONNX export, static int8 quantisation and a PyTorch-vs-ONNX Runtime agreement check.

The exported graph maps a normalised float ``input`` ``(batch, 3, H, W)`` to ``logits``
``(batch, C)`` with a dynamic batch axis; a model that fuses patient metadata (a fusion
model, or an ensemble with a fusion member) has a second input ``metadata`` ``(batch, D)``,
the vector of the checkpoint's ``metadata_encoder``. The checkpoint meta is stored as JSON
in the file's ``metadata_props`` (key :data:`predictor.ONNX_META_KEY`), so the ``.onnx``
file is self-describing and :class:`predictor.OnnxPredictor` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skin_lesion_classifier.inference.predictor import (
    ONNX_META_KEY,
    OnnxPredictor,
    Predictor,
    metadata_encoder_of,
)

logger = logging.getLogger(__name__)

#: Default tolerance on the max absolute difference of probabilities, fp32 ONNX vs PyTorch.
FP32_TOLERANCE = 1e-4
#: An int8 model is recommended only when its probabilities stay this close to PyTorch's
#: (max abs difference) and its top-1 class agrees this often.
INT8_MAX_DRIFT = 0.05
INT8_MIN_TOP1 = 0.99


def _json_meta(meta: Mapping[str, Any]) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray | torch.Tensor):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(
            f"meta value {o!r} of type {type(o).__name__} is not JSON-serialisable"
        )

    return json.dumps(dict(meta), default=default)


def set_onnx_meta(path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write ``meta`` (JSON) into the ONNX file's ``metadata_props``, in place."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props[ONNX_META_KEY] = _json_meta(meta)
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))


def export_onnx(
    model: torch.nn.Module,
    meta: Mapping[str, Any],
    path: str | os.PathLike,
    opset: int = 18,
) -> Path:
    """Export ``model`` (eval mode, CPU) to a single ``.onnx`` file with a dynamic batch axis.

    Uses ``torch.onnx.export`` (the ``torch.export``-based exporter), weights embedded in the
    file, and stores ``meta`` inside. A model with ``meta["uses_metadata"]`` gets a second
    input ``metadata`` ``(batch, D)`` (``D`` from the meta's ``metadata_encoder``). Returns
    the path.
    """
    enc = metadata_encoder_of(meta, "ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = (int(v) for v in meta["input_size"])
    model = model.to("cpu").eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    args: tuple[torch.Tensor, ...] = (torch.zeros(2, 3, h, w),)
    names = ["input"]
    if enc is not None:
        args += (torch.as_tensor(metadata_grid(enc, 2)),)
        names.append("metadata")
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                args,
                str(path),
                input_names=names,
                output_names=["logits"],
                dynamic_shapes=tuple({0: batch} for _ in args),
                opset_version=opset,
                external_data=False,
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; name the model
        raise ValueError(
            f"ONNX export of {meta.get('arch')} failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); serve the .pt checkpoint "
            "with the torch backend instead"
        ) from exc
    set_onnx_meta(path, meta)
    logger.info("Exported ONNX model to %s", path)
    return path


class _Calibration:
    """ONNX Runtime calibration reader over batches of model inputs."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibration_feeds(
    predictor: Predictor,
    images: np.ndarray,
    metadata: np.ndarray | None,
    batch_size: int = 16,
) -> list[dict[str, np.ndarray]]:
    """The model inputs (normalised ``input``, and ``metadata`` for fusion models) of
    ``images`` in batches, as the ONNX graph takes them."""
    from skin_lesion_classifier.data.transforms import to_float_nchw

    feeds = []
    for s in range(0, len(images), batch_size):
        x = to_float_nchw(
            images[s : s + batch_size], predictor.meta["mean"], predictor.meta["std"]
        )
        feed = {"input": x.numpy()}
        if metadata is not None:
            feed["metadata"] = np.asarray(metadata[s : s + batch_size], np.float32)
        feeds.append(feed)
    return feeds


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration: Sequence[dict[str, np.ndarray]],
) -> Path:
    """Static int8 quantisation (QDQ) of an exported model with ONNX Runtime.

    ``onnxruntime.quantization.quantize_static`` in the QDQ format: weights int8 per
    output channel, activations uint8 with ranges calibrated (min-max) on ``calibration``
    (batches of model inputs from :func:`calibration_feeds`, e.g. validation images);
    ONNX Runtime fuses the QuantizeLinear/DequantizeLinear pairs around Conv, MatMul and
    Gemm into integer kernels when it loads the model. The graph is pre-processed (shape
    inference, folding) first, as ONNX Runtime recommends. Whether the result keeps its
    answers is measured by :func:`export_and_verify` (:data:`INT8_MAX_DRIFT`,
    :data:`INT8_MIN_TOP1`).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("static int8 quantisation needs calibration images")
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    meta_props = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
        quantize_static(
            str(prepped),
            str(dst),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    if ONNX_META_KEY in meta_props:
        set_onnx_meta(dst, json.loads(meta_props[ONNX_META_KEY]))
    logger.info("Wrote int8 static-quantised (QDQ) model to %s", dst)
    return dst


def metadata_grid(encoder: Any, n: int) -> np.ndarray:
    """``(n, D)`` encoded metadata cycling through every sex, every site bucket and ages
    from blank to 85, so an agreement check exercises every metadata column."""
    import pandas as pd

    ages = [None, 5.0, 35.0, 50.0, 65.0, 85.0]
    sexes = list(encoder.sex_categories)
    sites = list(encoder.sites)
    rows = pd.DataFrame(
        {
            "age": [ages[i % len(ages)] for i in range(n)],
            "sex": [sexes[i % len(sexes)] for i in range(n)],
            "localization": [sites[i % len(sites)] for i in range(n)],
        },
        dtype=object,
    )
    return encoder.transform(rows)


def compare_predictors(
    reference: Predictor,
    other: Predictor,
    images: np.ndarray,
    metadata: Any = None,
) -> dict[str, float]:
    """How closely ``other`` reproduces ``reference`` on ``(N, H, W, 3)`` uint8 ``images``
    (and, for fusion models, ``metadata``: see :meth:`Predictor.encode_metadata`).

    Returns ``max_abs_diff = max |p_ref - p_other|`` over all images and classes,
    ``mean_abs_diff`` (the same, averaged) and ``top1_agreement`` (share of images whose
    arg-max class is the same).
    """
    p_ref = reference.predict(images, metadata)
    p_other = other.predict(images, metadata)
    diff = np.abs(p_ref.astype(np.float64) - p_other.astype(np.float64))
    return {
        "n_images": len(images),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "top1_agreement": float((p_ref.argmax(1) == p_other.argmax(1)).mean())
        if len(images)
        else 1.0,
    }


def export_and_verify(
    predictor: Predictor,
    out_path: str | os.PathLike,
    images: np.ndarray,
    int8: bool = True,
    tolerance: float = FP32_TOLERANCE,
    opset: int = 18,
    metadata: Any = None,
    calibration_images: np.ndarray | None = None,
) -> dict[str, Any]:
    """Export a torch predictor to ONNX (and int8), check agreement on ``images``.

    For a model that fuses metadata the check feeds ``metadata`` (see
    :meth:`Predictor.encode_metadata`) or, when ``None``, :func:`metadata_grid` (every sex,
    site and age bucket). Raises ``ValueError`` when the fp32 export disagrees with PyTorch
    by more than ``tolerance`` (max abs probability difference). The int8 model is
    calibrated on ``calibration_images`` (validation images; ``None``: the check images)
    and its drift reported, not bounded. Returns a report dict.
    """
    if predictor.torch_model is None:
        raise ValueError("export needs a PyTorch model (a .pt checkpoint)")
    out_path = Path(out_path)
    if predictor.metadata_encoder is not None and metadata is None:
        metadata = metadata_grid(predictor.metadata_encoder, len(images))
    export_onnx(predictor.torch_model, predictor.meta, out_path, opset=opset)
    fp32 = OnnxPredictor(out_path)
    report: dict[str, Any] = {
        "onnx_path": str(out_path),
        "tolerance": tolerance,
        "inputs": [i.name for i in fp32.session.get_inputs()],
        "fp32": compare_predictors(predictor, fp32, images, metadata),
    }
    if report["fp32"]["max_abs_diff"] > tolerance:
        raise ValueError(
            f"ONNX Runtime disagrees with PyTorch: max abs probability difference "
            f"{report['fp32']['max_abs_diff']:.3g} > tolerance {tolerance:g}"
        )
    if int8:
        q_path = out_path.with_name(out_path.stem + ".int8.onnx")
        calib = calibration_images if calibration_images is not None else images
        calib_meta = (  # encoded metadata covering every sex, site and age bucket
            None
            if predictor.metadata_encoder is None
            else metadata_grid(predictor.metadata_encoder, len(calib))
        )
        quantize_int8(out_path, q_path, calibration_feeds(predictor, calib, calib_meta))
        report["int8_path"] = str(q_path)
        report["int8"] = compare_predictors(
            predictor, OnnxPredictor(q_path), images, metadata
        )
        report["int8_recommended"] = bool(
            report["int8"]["max_abs_diff"] <= INT8_MAX_DRIFT
            and report["int8"]["top1_agreement"] >= INT8_MIN_TOP1
        )
        report["size_bytes"] = {
            "fp32": out_path.stat().st_size,
            "int8": q_path.stat().st_size,
        }
    return report
