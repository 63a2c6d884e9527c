"""ensemble: several architectures in one run (namespaced modular pipelines), metadata
fusion, a validation-weighted ensemble evaluated and reported like a single model.

For each member ``m`` of :data:`MEMBERS` (parameters ``ensemble.members.<m>``):

* ``m.*``: the model_input and training pipelines under namespace ``m`` with the
  project's ``model_input`` / ``training`` parameters and the member's input size,
  checkpoint folder and ``train`` keys on top (image cache at the member's size,
  training, its metrics in MLflow under ``m.``),
* ``m_meta.*``: the member with age, sex and site fused before the classifier (second
  stage on its frozen backbone) and the image-only control trained the same way,
* ``m.*`` / ``m_meta.*``: val/test predictions, then the evaluation pipeline's decision
  rule and metrics under the same namespace.

Then the ensemble of ``ensemble.combine`` with weights chosen on validation: one
checkpoint (``data/06_models/ensemble.pt``, also an MLflow artifact and a pyfunc model),
evaluated and reported by the evaluation and reporting pipelines under namespace
``ensemble``, and a comparison of every model against the best single model on test.

Add a member: a name here and its parameters under ``ensemble.members`` (and catalog
entries for its MLflow metrics in the ``ensemble`` section of ``conf/base/catalog.yml``).
"""

import warnings

from kedro.pipeline import Node, Pipeline, pipeline

from skin_lesion_classifier.pipelines.evaluation import create_pipeline as evaluation
from skin_lesion_classifier.pipelines.model_input import (
    create_pipeline as model_input,
)
from skin_lesion_classifier.pipelines.reporting import create_pipeline as reporting
from skin_lesion_classifier.pipelines.training import create_pipeline as training

from .nodes import (
    build_ensemble,
    build_image_ensemble,
    combine_test,
    combine_val,
    compare_node,
    ensemble_history,
    fit_ensemble_weights,
    member_parameters,
    predict_member_test,
    predict_member_val,
    train_member_fusion,
)

#: Member namespaces (each trains one architecture; see parameters_ensemble.yml).
MEMBERS = ("member_1", "member_2")
SHARED = {"split_assignment": "split_assignment", "image_index": "image_index"}


def _member_training(m: str) -> Pipeline:
    """model_input + training (without the MLflow pyfunc model) under namespace ``m``, with
    the project's parameters and the member's keys on top (:func:`member_parameters`)."""
    train = training(params="training_params")
    train = train - train.only_nodes_with_outputs("mlflow_model", "model_registration")
    member = Node(
        member_parameters,
        ["params:model_input", "params:training", f"params:ensemble.members.{m}"],
        ["model_input_params", "training_params"],
        name="member_parameters",
    )
    return pipeline(
        Pipeline([member]) + model_input(params="model_input_params") + train,
        namespace=m,
        inputs=SHARED,
        parameters={
            "params:model_input": "params:model_input",
            "params:training": "params:training",
            f"params:ensemble.members.{m}": f"params:ensemble.members.{m}",
        },
    )


def _predictions(name: str, cache: str) -> Pipeline:
    """Val and test predictions of model ``name`` (namespace ``name``)."""
    args = [
        "model_checkpoint",
        "split_assignment",
        "image_cache",
        "image_index",
        "params:ensemble",
    ]
    return pipeline(
        [
            Node(predict_member_val, args, "val_predictions", name="predict_val"),
            Node(predict_member_test, args, "test_predictions", name="predict_test"),
        ],
        namespace=name,
        inputs={**SHARED, "image_cache": cache},
        parameters={"params:ensemble": "params:ensemble"},
    )


def _evaluation(name: str) -> Pipeline:
    """The evaluation pipeline from the predictions on (decision rule on val, metrics)."""
    tail = evaluation().from_inputs("val_predictions", "test_predictions")
    return pipeline(
        tail,
        namespace=name,
        inputs=SHARED,
        parameters={"params:evaluation": "params:evaluation"},
    )


def _fusion(m: str) -> Pipeline:
    """Namespace ``m_meta``: the fusion second stage on member ``m``, with its image-only
    control's predictions (``m_meta.control_*_predictions``)."""
    f = f"{m}_meta"
    return pipeline(
        [
            Node(
                train_member_fusion,
                [
                    "base_checkpoint",
                    "image_cache",
                    "split_assignment",
                    "image_index",
                    "params:ensemble",
                ],
                [
                    "model_checkpoint",
                    "fusion_history",
                    "control_val_predictions",
                    "control_test_predictions",
                ],
                name="train_fusion",
            )
        ],
        namespace=f,
        inputs={
            **SHARED,
            "base_checkpoint": f"{m}.model_checkpoint",
            "image_cache": f"{m}.image_cache",
        },
        parameters={"params:ensemble": "params:ensemble"},
    )


def predictions_of(model: str, split: str) -> str:
    """The dataset holding ``split`` predictions of ``model`` (a name of :func:`all_models`)."""
    if model.endswith("_control"):
        return f"{model.removesuffix('_control')}.control_{split}_predictions"
    return f"{model}.{split}_predictions"


def all_models() -> list[str]:
    """Every model the pipeline predicts with: members, fusions, controls."""
    return [
        *MEMBERS,
        *(f"{m}_meta" for m in MEMBERS),
        *(f"{m}_meta_control" for m in MEMBERS),
    ]


def create_pipeline(**kwargs) -> Pipeline:
    # the fusion, evaluation and ensemble namespaces read other namespaces' outputs
    # (``member_1.model_checkpoint``) on purpose; Kedro warns about every dotted name
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="One or more dataset names contain '.'",
            category=UserWarning,
        )
        return _create_pipeline()


def _create_pipeline() -> Pipeline:
    parts = []
    for m in MEMBERS:
        parts += [
            _member_training(m),
            _predictions(m, f"{m}.image_cache"),
            _evaluation(m),
            _fusion(m),
            _predictions(f"{m}_meta", f"{m}.image_cache"),
            _evaluation(f"{m}_meta"),
        ]
    candidates = [*MEMBERS, *(f"{m}_meta" for m in MEMBERS)]
    val = {n: f"val__{n}" for n in candidates}
    test = {n: f"test__{n}" for n in candidates}
    outside = {
        **{f"val__{n}": predictions_of(n, "val") for n in all_models()},
        **{f"test__{n}": predictions_of(n, "test") for n in all_models()},
        **{f"ckpt__{n}": f"{n}.model_checkpoint" for n in candidates},
        **{f"hist__{m}": f"{m}.training_history" for m in MEMBERS},
    }
    ensemble_nodes = [
        Node(
            fit_ensemble_weights,
            {"params": "params:ensemble", **val},
            "weights",
            name="fit_weights",
        ),
        Node(
            build_ensemble,
            {"weights": "weights", **{n: f"ckpt__{n}" for n in candidates}},
            "model_checkpoint",
            name="build_ensemble",
        ),
        Node(
            build_image_ensemble,
            {"weights": "weights", **{m: f"ckpt__{m}" for m in MEMBERS}},
            "image_model_checkpoint",
            name="build_image_ensemble",
        ),
        Node(
            combine_val,
            {"weights": "weights", **val},
            "val_predictions",
            name="combine_val",
        ),
        Node(
            combine_test,
            {"weights": "weights", **test},
            "test_predictions",
            name="combine_test",
        ),
        Node(
            ensemble_history,
            {"weights": "weights", **{m: f"hist__{m}" for m in MEMBERS}},
            "training_history",
            name="training_history",
        ),
        Node(
            compare_node,
            {
                "params": "params:ensemble",
                "weights": "weights",
                **{f"val__{n}": f"val__{n}" for n in all_models()},
                **{f"test__{n}": f"test__{n}" for n in all_models()},
            },
            ["comparison", "comparison_md", "comparison_metrics"],
            name="compare_models",
        ),
    ]
    parts.append(
        pipeline(
            ensemble_nodes,
            namespace="ensemble",
            inputs=outside,
            parameters={"params:ensemble": "params:ensemble"},
        )
    )
    parts.append(_evaluation("ensemble"))
    parts.append(
        pipeline(
            reporting(),
            namespace="ensemble",
            inputs={"split_assignment": "split_assignment"},
            parameters={
                "params:evaluation": "params:evaluation",
                "params:reporting": "params:ensemble.reporting",
            },
        )
    )
    mlflow_model = training().only_nodes_with_outputs("mlflow_model")  # not registered
    parts.append(
        pipeline(
            mlflow_model,
            namespace="ensemble",
            parameters={"params:training": "params:ensemble.mlflow"},
        )
    )
    return sum(parts, Pipeline([]))
