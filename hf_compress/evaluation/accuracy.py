"""Top-1 accuracy of saved image classifiers through the Hugging Face stack, with bootstrap confidence intervals.

`Accuracy` is a local `evaluate.Metric`: `evaluate.load("accuracy")` fetches the metric's script from the Hub, which
an offline machine cannot reach, so the package ships its own. `pipeline_accuracy` loads a checkpoint with the stock
Auto classes (hf-compress registers its families on import), runs it through the stock
`pipeline("image-classification")` with the image processor saved beside it, and scores the predictions with
`evaluate.evaluator("image-classification")` (strategy `"bootstrap"`: scipy's BCa interval). Nothing is downloaded.

Needs the `evaluate` and `scipy` packages (imported here, not by the rest of hf-compress).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np

from ..data.images import ImageClassificationData
from ..errors import HFCompressError

_DESCRIPTION = "Top-1 accuracy: the fraction of predictions equal to their reference label."
_INPUTS = """
Args:
    predictions (`list[int]`): predicted label ids.
    references (`list[int]`): reference label ids.
Returns:
    accuracy (`float`): the fraction of predictions equal to their reference, in [0, 1].
"""


class Accuracy(evaluate.Metric):
    """Top-1 accuracy as an `evaluate.Metric` that needs no download (`Accuracy().compute(predictions=...,
    references=...)`; `add_batch` and distributed use work as for any `evaluate` metric)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape or predictions.ndim != 1:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} must be two "
                             "1-D sequences of the same length")
        if len(references) == 0:
            raise ValueError("accuracy of no examples")
        return {"accuracy": float(np.mean(predictions == references))}

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict[str, float] | None:
        """As `evaluate.Metric.compute`. A single-process call that passes all its inputs at once skips the Arrow
        table the base class stores them in first: the bootstrap calls `compute` once per resample and once per
        jackknife sample (about 20,000 times on 10,000 images), where that round trip would take minutes."""
        nothing_stored = getattr(self, "writer", None) is None and getattr(self, "buf_writer", None) is None
        single_call = predictions is not None and references is not None and not kwargs and self.num_process == 1
        if single_call and nothing_stored:
            return self._compute(predictions=predictions, references=references)
        return super().compute(predictions=predictions, references=references, **kwargs)


@dataclass
class AccuracyResult:
    """What `pipeline_accuracy` returns.

    Attributes:
        accuracy: top-1 accuracy in [0, 1].
        ci_low, ci_high: the bootstrap confidence interval of the accuracy at `confidence_level`.
        standard_error: bootstrap standard error of the accuracy.
        num_images: images evaluated.
        n_resamples: bootstrap resamples.
        seconds: wall time of the evaluation (predictions and bootstrap).
    """

    accuracy: float
    ci_low: float
    ci_high: float
    standard_error: float
    confidence_level: float
    num_images: int
    n_resamples: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_classification_dataset(data: ImageClassificationData) -> datasets.Dataset:
    """`data` as a `datasets.Dataset` with an `image` column (PIL images) and a `label` column (`ClassLabel`), the
    layout the image-classification pipeline and evaluator read."""
    from PIL import Image

    images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in data.images.cpu()]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(data.class_names))})
    return datasets.Dataset.from_dict({"image": images, "label": data.labels.cpu().tolist()}, features=features)


def _load_classifier(model_dir: Path):
    """The checkpoint's model (stock Auto class) and the image processor saved beside it."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if not (model_dir / "preprocessor_config.json").is_file():
        raise HFCompressError(f"{model_dir} carries no image processor (preprocessor_config.json): the pipeline would "
                              "not know how to prepare the images")
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    return model.eval(), processor


def pipeline_accuracy(
    model_dir: str | os.PathLike,
    data: ImageClassificationData,
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    random_state: int = 0,
    batch_size: int = 64,
    device: int | None = None,
) -> AccuracyResult:
    """Test accuracy of a saved image classifier through `pipeline("image-classification")` and
    `evaluate.evaluator("image-classification")`, with a bootstrap confidence interval.

    Args:
        model_dir: a checkpoint folder with its `preprocessor_config.json` (as `vision.checkpoint.save_checkpoint`
            writes it).
        data: the images and labels; its class names must be the model's labels, in the same order.
        confidence_level, n_resamples, random_state: of scipy's bootstrap (BCa), as the evaluator passes them.
        batch_size: images per forward of the pipeline.
        device: the pipeline's device (-1 CPU, 0 the first GPU); None lets `evaluate` choose.
    """
    model_dir = Path(model_dir)
    if len(data) == 0:
        raise HFCompressError("the evaluation dataset is empty")
    model, processor = _load_classifier(model_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if labels != list(data.class_names):
        raise HFCompressError(f"{model_dir} predicts labels {labels}, but the data's classes are "
                              f"{list(data.class_names)}")
    start = time.perf_counter()
    task = evaluate.evaluator("image-classification")
    # The evaluator calls the pipeline on the whole column; batching is a call argument of the pipeline.
    task.PIPELINE_KWARGS = {"batch_size": batch_size}
    result = task.compute(
        model_or_pipeline=model, feature_extractor=processor, data=image_classification_dataset(data),
        metric=Accuracy(keep_in_memory=True), label_mapping={name: i for i, name in enumerate(labels)},
        strategy="bootstrap", confidence_level=confidence_level, n_resamples=n_resamples, random_state=random_state,
        device=device,
    )
    accuracy = result["accuracy"]
    low, high = (float(v) for v in accuracy["confidence_interval"])
    score = float(accuracy["score"])
    if not (math.isfinite(low) and math.isfinite(high)) and score in (0.0, 1.0):
        # Every resample scores the same when all or no predictions are right: scipy reports a degenerate (NaN)
        # interval, whose honest value is the point itself.
        low = high = score
    return AccuracyResult(
        accuracy=score, ci_low=low, ci_high=high, standard_error=float(accuracy["standard_error"]),
        confidence_level=confidence_level, num_images=len(data), n_resamples=n_resamples,
        seconds=time.perf_counter() - start,
    )
