"""``skin-lesion-classifier`` command line: predict, serve, export-onnx, bench-inference, api-docs.

Examples::

    skin-lesion-classifier predict ../shared/data/ham10000-samples/images --output predictions.csv
    skin-lesion-classifier predict <folder> --model data/06_models/ensemble/ensemble.pt \
        --metadata ../shared/data/ham10000/HAM10000_metadata.csv
    skin-lesion-classifier serve --model data/06_models/model.pt           # http://127.0.0.1:8000
    skin-lesion-classifier export-onnx --model data/06_models/model.pt --output data/06_models/model.onnx
    skin-lesion-classifier bench-inference --arch tf_efficientnet_lite0 --input-size 192 256
    skin-lesion-classifier api-docs --output docs/api/openapi.json

``--model`` takes a ``.pt`` checkpoint, an ``.onnx`` export, ``runs:/<run_id>/model`` or
``models:/<name>/<version>``; the default is ``data/06_models/model.pt``.

Kedro treats ``<package>/cli.py`` as the project's command-line extension: it needs a
click group named ``cli`` (its commands are added to ``kedro``, so ``kedro predict ...``
works too) and a ``run`` command (Kedro's own, served lazily through ``__getattr__``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from skin_lesion_classifier.api.model_source import DEFAULT_MODEL
from skin_lesion_classifier.data.images import MAX_PIXELS

#: Exit status of ``serve`` when the model cannot be loaded (as uvicorn's failed start-up).
SERVE_STARTUP_FAILED = 3

logger = logging.getLogger("skin_lesion_classifier.cli")

DEFAULT_SAMPLES = "../shared/data/ham10000-samples/images"


def _echo(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=os.environ.get("SLC_MODEL", DEFAULT_MODEL),
        help="model: .pt, .onnx, runs:/<id>/model or models:/<name>/<version> (default %(default)s)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="auto follows the file suffix",
    )
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, mps or auto (default %(default)s)"
    )
    p.add_argument(
        "--decision",
        default=os.environ.get("SLC_DECISION"),
        help="decision_rule.json to apply (default: checkpoint meta, else decision_rule.json beside the model)",
    )
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow tracking URI for runs:/ and models:/ references",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skin-lesion-classifier", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "predict", help="predict a folder or list of images into an ISIC-format CSV"
    )
    p.add_argument("inputs", nargs="+", help="a folder of images, or image files")
    _add_model_args(p)
    p.add_argument(
        "--output",
        default="data/07_model_output/isic_predictions.csv",
        help="ISIC CSV to write",
    )
    p.add_argument(
        "--errors", default=None, help="errors CSV (default: <output stem>_errors.csv)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help="largest picture decoded, in pixels read from its header; a larger one goes "
        "to the errors file with the limit named (default %(default)s)",
    )
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument(
        "--tta", action="store_true", help="average flips / rotations (torch backend)"
    )
    p.add_argument(
        "--metadata",
        default=None,
        help="patient metadata CSV (image_id or image, age, sex, localization) for models "
        "that fuse metadata; pictures without a row are predicted with every field unknown",
    )

    p = sub.add_parser("serve", help="run the HTTP service (FastAPI + uvicorn)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--explain-checkpoint",
        default=None,
        help=".pt checkpoint for /explain beside an ONNX model",
    )
    p.add_argument(
        "--max-upload-bytes",
        type=int,
        default=None,
        help="largest accepted picture (default: SLC_MAX_UPLOAD_BYTES, else 10 MiB)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest accepted picture in pixels, checked before decoding (default: "
        "SLC_MAX_PIXELS, else 40 million)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (0 = library default)"
    )
    p.add_argument(
        "--reload", action="store_true", help="development mode: reload on code changes"
    )
    p.add_argument("--log-level", default="info")

    p = sub.add_parser(
        "export-onnx",
        help="export a checkpoint to ONNX (+ int8) and check it against PyTorch",
    )
    _add_model_args(p)
    p.add_argument(
        "--output",
        default=None,
        help="ONNX file (default: beside the checkpoint, .onnx)",
    )
    p.add_argument(
        "--images",
        default=DEFAULT_SAMPLES,
        help="folder of pictures for the agreement check",
    )
    p.add_argument(
        "--n-check", type=int, default=16, help="pictures used for the agreement check"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max abs probability difference (default 1e-4)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write a static int8 (QDQ) model and report its drift (off by "
        "default: on the quick EfficientNet-Lite0 model it changes answers)",
    )
    p.add_argument(
        "--calibration-images",
        default=None,
        help="folder of validation pictures that calibrate int8 (default: --images)",
    )
    p.add_argument("--opset", type=int, default=18)

    p = sub.add_parser(
        "bench-inference",
        help="CPU latency / throughput of PyTorch and ONNX Runtime, service req/s",
    )
    p.add_argument(
        "--model",
        default=None,
        help=".pt checkpoint; default: build --arch with offline weights",
    )
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument(
        "--input-size", type=int, nargs=2, default=(192, 256), metavar=("H", "W")
    )
    p.add_argument(
        "--images", default=DEFAULT_SAMPLES, help="folder of pictures to feed"
    )
    p.add_argument("--n", type=int, default=50, help="single-image calls per backend")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-batches", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads for both backends (0 = all cores)",
    )
    p.add_argument("--no-int8", action="store_true")
    p.add_argument(
        "--service-requests",
        type=int,
        default=200,
        help="0 skips the service load test",
    )
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument(
        "--time-cap", type=float, default=60.0, help="seconds, per service load test"
    )
    p.add_argument(
        "--service-backends",
        default="torch,onnx",
        help="comma-separated backends to load-test",
    )
    p.add_argument(
        "--json", default=None, help="also write the figures to this JSON file"
    )

    p = sub.add_parser("api-docs", help="write the service's OpenAPI schema")
    p.add_argument("--output", default="docs/api/openapi.json")
    return parser


# ------------------------------------------------------------------------ commands
def cmd_predict(args: argparse.Namespace) -> int:
    from skin_lesion_classifier.api.model_source import open_predictor
    from skin_lesion_classifier.device import detect_device
    from skin_lesion_classifier.inference.batch import (
        collect_inputs,
        predict_files,
        read_metadata_csv,
    )

    out = Path(args.output)
    err = Path(args.errors) if args.errors else out.with_name(out.stem + "_errors.csv")
    _check_output_file(out, "--output", "isic_predictions.csv")
    _check_output_file(err, "--errors", "isic_predictions_errors.csv")
    if out.resolve() == err.resolve():
        raise ValueError(f"--output and --errors are the same file: {out}")
    inputs: Any = args.inputs[0] if len(args.inputs) == 1 else args.inputs
    paths = collect_inputs(inputs, recursive=args.recursive)
    metadata = read_metadata_csv(args.metadata) if args.metadata else None
    predictor = open_predictor(
        args.model, backend=args.backend, device=detect_device(args.device), tracking_uri=args.tracking_uri,
        decision_file=args.decision,
        batch_size=args.batch_size, **({"tta": True} if args.tta else {}),
    )  # fmt: skip
    predictions, errors = predict_files(
        predictor, paths, args.batch_size, metadata, max_pixels=args.max_pixels
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    err.parent.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(out, index=False, float_format="%.6f")
    errors.to_csv(err, index=False)
    _echo(
        f"model: {predictor.version} ({predictor.backend}); decision: {predictor.decision.as_dict()}"
    )
    _echo(f"predicted {len(predictions)} image(s) -> {out}")
    _echo(f"not predicted {len(errors)} input(s), each with its reason -> {err}")
    for row in errors.itertuples():
        _echo(f"  {row.reason}")
    _echo(_metadata_summary(predictor, predictions, args.metadata))
    return 0


def _check_output_file(path: Path, option: str, example: str) -> None:
    """Stop before any work when ``path`` cannot be written as a file: an existing
    folder, a missing folder below a file, or a folder without write permission."""
    if path.is_dir():
        raise ValueError(
            f"{option} {path} is an existing folder; give a file name, e.g. "
            f"{path / example}"
        )
    folder = path.parent
    while not folder.exists():  # the first existing folder above: mkdir starts there
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (
        path.exists() and not os.access(path, os.W_OK)
    ):
        raise ValueError(f"{option} {path}: no permission to write there")


def _metadata_summary(predictor: Any, predictions: Any, source: str | None) -> str:
    """One line on how patient metadata was used in a batch prediction."""
    members = (predictor.describe().get("ensemble") or {}).get("members")
    what = (
        f"ensemble of {sum(1 for m in members if m.get('kept', True))} model(s)"
        if members
        else "model"
    )
    if not predictor.uses_metadata:
        return f"metadata: the {what} is image-only" + (
            f"; {source} was not used" if source else ""
        )
    counts = predictions["metadata"].value_counts()
    line = (
        f"metadata: the {what} fuses age, sex and site; "
        f"{counts.get('provided', 0)} image(s) with every field, "
        f"{counts.get('partial', 0)} with some unknown, "
        f"{counts.get('missing', 0)} without a row (all unknown; column 'metadata' = missing)"
    )
    return line if source else line + "; give --metadata CSV to use patients' data"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from skin_lesion_classifier.api.app import (
        ServiceSettings,
        create_app,
        load_predictor_for,
    )
    from skin_lesion_classifier.api.protocol import HeaderTimeoutProtocol

    env = {
        "SLC_MODEL": args.model,
        "SLC_BACKEND": args.backend,
        "SLC_DEVICE": args.device,
        "SLC_THREADS": str(args.threads),
        "MLFLOW_TRACKING_URI": args.tracking_uri,
    }
    if args.decision:
        env["SLC_DECISION"] = args.decision
    if args.explain_checkpoint:
        env["SLC_EXPLAIN_CHECKPOINT"] = args.explain_checkpoint
    if args.max_upload_bytes:
        env["SLC_MAX_UPLOAD_BYTES"] = str(args.max_upload_bytes)
    if args.max_pixels:
        env["SLC_MAX_PIXELS"] = str(args.max_pixels)
    os.environ.update(env)  # read by ServiceSettings, also in --reload's child process
    settings = ServiceSettings()
    try:  # load here, so a bad model file ends with one clear line, not tracebacks
        predictor = load_predictor_for(settings)
    except Exception as exc:  # noqa: BLE001 - any loading failure: its message, rc 3
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        sys.stderr.write(f"error: {first[:500]}\n")
        return SERVE_STARTUP_FAILED
    app = (
        "skin_lesion_classifier.api.app:create_app"
        if args.reload
        else create_app(settings, predictor=predictor)
    )
    uvicorn.run(
        app,
        factory=args.reload,
        host=args.host,
        port=args.port,
        reload=args.reload,
        reload_dirs=[str(Path(__file__).parent)] if args.reload else None,
        log_level=args.log_level,
        server_header=False,
        http=HeaderTimeoutProtocol,  # a request head must arrive in SLC_HEADER_TIMEOUT_S
    )
    return 0


def _sample_images(folder: str, size: tuple[int, int], n: int) -> Any:
    import numpy as np

    from skin_lesion_classifier.data.images import ImageDecodeError, load_resized
    from skin_lesion_classifier.inference.batch import collect_inputs

    images = []
    for path in collect_inputs(folder):
        try:
            images.append(load_resized(path, size))
        except ImageDecodeError as exc:
            logger.warning("skipping %s", exc)
        if len(images) >= n:
            break
    if not images:
        raise FileNotFoundError(f"no readable pictures in {folder}")
    return np.stack(images)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from skin_lesion_classifier.api.model_source import open_predictor
    from skin_lesion_classifier.inference.onnx_export import (
        FP32_TOLERANCE,
        export_and_verify,
    )

    predictor = open_predictor(
        args.model,
        backend="torch",
        tracking_uri=args.tracking_uri,
        decision_file=args.decision,
    )
    from skin_lesion_classifier.inference.versions import resolve_version

    # beside the checkpoint: inside its version folder for a versioned model
    default = resolve_version(args.model).with_suffix(".onnx")
    output = Path(args.output) if args.output else default
    if args.output is None and ":/" in str(args.model):
        output = Path("data/06_models/model.onnx")
    images = _sample_images(args.images, predictor.input_size, args.n_check)
    calib = (
        None
        if args.calibration_images is None
        else _sample_images(args.calibration_images, predictor.input_size, 256)
    )
    report = export_and_verify(
        predictor, output, images, int8=args.int8, calibration_images=calib,
        tolerance=args.tolerance if args.tolerance is not None else FP32_TOLERANCE, opset=args.opset,
    )  # fmt: skip
    _echo(f"exported {report['onnx_path']} (inputs: {', '.join(report['inputs'])})")
    f = report["fp32"]
    _echo(
        f"fp32 ONNX Runtime vs PyTorch on {f['n_images']} pictures: max |dp| = {f['max_abs_diff']:.3g} "
        f"(tolerance {report['tolerance']:g}), mean {f['mean_abs_diff']:.3g}, top-1 agreement {f['top1_agreement']:.3f}"
    )
    if "int8" in report:
        q = report["int8"]
        _echo(
            f"int8 model {report['int8_path']}: {report['size_bytes']['int8']} bytes (fp32 {report['size_bytes']['fp32']})"
        )
        _echo(
            f"int8 vs PyTorch: max |dp| = {q['max_abs_diff']:.3g}, mean {q['mean_abs_diff']:.3g}, "
            f"top-1 agreement {q['top1_agreement']:.3f}"
        )
        _echo(
            "int8 recommended: yes"
            if report["int8_recommended"]
            else "int8 NOT recommended (drift above the bound); serve the fp32 ONNX model"
        )
    return 0


def _bench_checkpoint(args: argparse.Namespace, workdir: Path) -> Path:
    """The checkpoint to benchmark: ``--model`` or ``--arch`` built through the factory
    (offline pretrained weights where packaged, else random initialisation)."""
    if args.model:
        from skin_lesion_classifier.inference.versions import resolve_version

        return resolve_version(args.model)  # a versioned folder: its latest version
    from skin_lesion_classifier.constants import CLASSES
    from skin_lesion_classifier.models.checkpoint import save_checkpoint
    from skin_lesion_classifier.models.factory import (
        create_model,
        resolve_preprocessing,
    )

    model = create_model(args.arch, num_classes=len(CLASSES), pretrained=True, allow_random_init=True,
                         input_size=list(args.input_size))  # fmt: skip
    pre = resolve_preprocessing(model)
    meta = {"arch": args.arch, "classes": list(CLASSES), "input_size": list(args.input_size),
            "mean": pre["mean"], "std": pre["std"]}  # fmt: skip
    return save_checkpoint(workdir / "bench.pt", model, meta)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from skin_lesion_classifier.api.loadtest import load_test
    from skin_lesion_classifier.api.server import LocalServer
    from skin_lesion_classifier.inference.batch import collect_inputs
    from skin_lesion_classifier.inference.bench import bench_predictor
    from skin_lesion_classifier.inference.onnx_export import (
        calibration_feeds,
        export_onnx,
        quantize_int8,
    )
    from skin_lesion_classifier.inference.predictor import OnnxPredictor, TorchPredictor

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    results: dict[str, Any] = {
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="slc-bench-") as tmp:
        tmpdir = Path(tmp)
        ckpt = _bench_checkpoint(args, tmpdir)
        torch_pred = TorchPredictor.from_checkpoint(
            ckpt, device="cpu", batch_size=args.batch_size
        )
        h, w = torch_pred.input_size
        results["model"] = {
            "arch": torch_pred.meta["arch"],
            "input_size": [h, w],
            "checkpoint": str(ckpt),
        }
        images = _sample_images(args.images, (h, w), 32)
        onnx_path = export_onnx(
            torch_pred.torch_model, torch_pred.meta, tmpdir / "bench.onnx"
        )
        predictors = {
            "pytorch": torch_pred,
            "onnxruntime-fp32": OnnxPredictor(
                onnx_path, threads=threads, batch_size=args.batch_size
            ),
        }
        if not args.no_int8:
            # calibrated on the pictures it is timed on (a latency figure, not accuracy)
            q = quantize_int8(
                onnx_path,
                tmpdir / "bench.int8.onnx",
                calibration_feeds(torch_pred, images, None),
            )
            predictors["onnxruntime-int8"] = OnnxPredictor(
                q, threads=threads, batch_size=args.batch_size
            )
        _echo(
            f"model {results['model']['arch']} at {h}x{w}, {threads} thread(s), {len(images)} real pictures"
        )
        _echo(
            f"{'backend':<18} {'median ms':>10} {'p95 ms':>8} {'images/s':>9}  (batch {args.batch_size})"
        )
        results["backends"] = {}
        for name, pred in predictors.items():
            r = bench_predictor(
                pred,
                images,
                n=args.n,
                batch_size=args.batch_size,
                n_batches=args.n_batches,
            )
            results["backends"][name] = r
            lat, thr = r["latency"], r["throughput"]
            _echo(
                f"{name:<18} {lat['median_ms']:>10.2f} {lat['p95_ms']:>8.2f} {thr['images_per_s']:>9.1f}"
            )
        if "onnxruntime-int8" in predictors:
            p_t = torch_pred.predict(images)
            p_q = predictors["onnxruntime-int8"].predict(images)
            results["int8_max_abs_diff"] = float(abs(p_t - p_q).max())
            results["int8_top1_agreement"] = float(
                (p_t.argmax(1) == p_q.argmax(1)).mean()
            )
            _echo(f"int8 drift vs PyTorch on {len(images)} pictures: max |dp| = {results['int8_max_abs_diff']:.3g}, "
                  f"top-1 agreement {results['int8_top1_agreement']:.3f}")  # fmt: skip

        if args.service_requests > 0:
            files = [
                p
                for p in collect_inputs(args.images)
                if p.suffix.lower() in (".jpg", ".jpeg", ".png")
            ]
            results["service"] = {}
            models = {"torch": str(ckpt), "onnx": str(onnx_path)}
            for backend in [
                b.strip() for b in args.service_backends.split(",") if b.strip()
            ]:
                env = {
                    "SLC_MODEL": models[backend],
                    "SLC_BACKEND": backend,
                    "SLC_THREADS": str(threads),
                }
                with LocalServer(
                    env, log_path=tmpdir / f"serve-{backend}.log"
                ) as server:
                    r = load_test(server.url, files, n_requests=args.service_requests,
                                  concurrency=args.concurrency, time_cap_s=args.time_cap)  # fmt: skip
                results["service"][backend] = r
                lat = r["latency"] or {
                    "median_ms": float("nan"),
                    "p95_ms": float("nan"),
                }
                _echo(
                    f"service ({backend}) POST /predict, {r['requests_ok']} ok / {sum(r['errors'].values())} failed, "
                    f"{r['concurrency']} concurrent: {r['requests_per_s']:.1f} req/s, "
                    f"median {lat['median_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms"
                    + (" (time cap hit)" if r["capped_by_time"] else "")
                )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        _echo(f"figures written to {args.json}")
    return 0


def cmd_api_docs(args: argparse.Namespace) -> int:
    from skin_lesion_classifier.api.app import ServiceSettings, create_app

    schema = create_app(ServiceSettings()).openapi()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(schema, indent=2) + "\n")
    _echo(f"OpenAPI schema ({len(schema['paths'])} paths) -> {out}")
    return 0


COMMANDS = {
    "predict": cmd_predict,
    "serve": cmd_serve,
    "export-onnx": cmd_export_onnx,
    "bench-inference": cmd_bench,
    "api-docs": cmd_api_docs,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skin-lesion-classifier`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


# ------------------------------------------------------------------------ Kedro hooks
@click.group(name="skin-lesion-classifier")
def cli() -> None:
    """Inference, serving and benchmark commands of skin-lesion-classifier."""


def _passthrough(name: str) -> None:
    @cli.command(
        name=name,
        help=f"skin-lesion-classifier {name} (run with --help for its options)",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    @click.pass_context
    def command(ctx: click.Context) -> None:
        ctx.exit(main([name, *ctx.args]))


for _name in COMMANDS:
    _passthrough(_name)


def __getattr__(name: str) -> Any:
    # Kedro's ``find_run_command`` (used by ``__main__``) looks for ``run`` in this module.
    if name == "run":
        from kedro.framework.cli.project import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
