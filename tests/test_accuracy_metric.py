"""Accuracy through the ecosystem: the local `evaluate` metric and a saved checkpoint's accuracy through the stock
image-classification pipeline and `evaluate.evaluator`, with bootstrap intervals, offline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("evaluate")
pytest.importorskip("scipy")

from hf_compress.data.images import ImageClassificationData  # noqa: E402
from hf_compress.errors import HFCompressError  # noqa: E402
from hf_compress.evaluation.accuracy import Accuracy, image_classification_dataset, pipeline_accuracy  # noqa: E402
from hf_compress.modeling.pruned_cnn import PrunedCNNForImageClassification, resnet_cifar_config  # noqa: E402
from hf_compress.vision.checkpoint import save_checkpoint  # noqa: E402

torch.set_num_threads(2)

# Not CIFAR-10's statistics: a pipeline that ignored the saved image processor would normalise differently.
MEAN, STD = (0.3, 0.6, 0.2), (0.15, 0.3, 0.25)


def test_the_local_metric_is_the_fraction_of_matches_on_both_compute_paths():
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    expected = float(np.mean(predictions == references))
    metric = Accuracy(keep_in_memory=True)
    assert metric.compute(predictions=predictions.tolist(), references=references.tolist()) == {"accuracy": expected}
    # The stock route (inputs stored batch by batch in the Arrow table first) gives the same number.
    for start in range(0, 500, 128):
        metric.add_batch(predictions=predictions[start : start + 128], references=references[start : start + 128])
    assert metric.compute() == {"accuracy": expected}
    three = Accuracy(keep_in_memory=True).compute(predictions=[1, 2, 3], references=[1, 0, 3])
    assert three["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        Accuracy(keep_in_memory=True).compute(predictions=[1, 2], references=[1, 2, 3])


def _checkpoint(tmp_path, classes: list[str]):
    torch.manual_seed(0)
    labels = {"id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}}
    model = PrunedCNNForImageClassification(resnet_cifar_config(8, (4, 6, 8), image_size=16, **labels)).eval()
    # Random BN statistics spread the features, so that the predictions vary across images (a fresh network gives
    # every image the same class).
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g)
            m.running_var = torch.rand(m.num_features, generator=g) * 0.05 + 0.01
    path = tmp_path / "model"
    save_checkpoint(model, path, mean=MEAN, std=STD)
    return model, path


def _data(n: int, classes: list[str], seed: int = 0) -> ImageClassificationData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    images[:, 0] //= (1 + torch.arange(n) % 3)[:, None, None].to(torch.uint8)  # brightness varies between images
    labels = torch.randint(0, len(classes), (n,), generator=g)
    return ImageClassificationData(images, labels, classes, mean=MEAN, std=STD)


def test_pipeline_accuracy_equals_an_independent_argmax_and_its_interval_brackets_it(tmp_path):
    classes = ["cat", "dog", "ship"]
    model, path = _checkpoint(tmp_path, classes)
    assert json.loads((path / "preprocessor_config.json").read_text())["image_mean"] == list(MEAN)
    data = _data(48, classes)
    with torch.no_grad():
        logits = model(pixel_values=data.normalize(data.images)).logits
    predictions = logits.argmax(-1)
    assert len(set(predictions.tolist())) > 1  # not one class for every image
    expected = int((predictions == data.labels).sum()) / len(data)
    assert 0 < expected < 1

    result = pipeline_accuracy(path, data, n_resamples=500, random_state=0, batch_size=16, device=-1)
    assert result.accuracy == pytest.approx(expected, abs=1e-12)
    assert result.num_images == 48 and result.confidence_level == 0.95
    assert result.ci_low <= result.accuracy <= result.ci_high and result.ci_low < result.ci_high
    # The bootstrap standard error of a proportion is about sqrt(p (1 - p) / n).
    binomial = math.sqrt(expected * (1 - expected) / len(data))
    assert 0.6 * binomial < result.standard_error < 1.4 * binomial
    # A 95% interval spans about 2 x 1.96 standard errors.
    assert 0.6 * 3.92 * binomial < result.ci_high - result.ci_low < 1.5 * 3.92 * binomial
    again = pipeline_accuracy(path, data, n_resamples=500, random_state=0, batch_size=5, device=-1)
    assert (again.accuracy, again.ci_low, again.ci_high) == (result.accuracy, result.ci_low, result.ci_high)


def test_the_dataset_holds_the_images_and_labels_unchanged():
    data = _data(6, ["a", "b"], seed=3)
    dataset = image_classification_dataset(data)
    assert dataset.features["label"].names == ["a", "b"] and dataset["label"] == data.labels.tolist()
    for i, image in enumerate(dataset["image"]):
        assert torch.equal(torch.from_numpy(np.array(image)).permute(2, 0, 1), data.images[i])


def test_pipeline_accuracy_refuses_a_checkpoint_without_processor_or_with_other_labels(tmp_path):
    classes = ["cat", "dog", "ship"]
    _, path = _checkpoint(tmp_path, classes)
    with pytest.raises(HFCompressError, match="predicts labels"):
        pipeline_accuracy(path, _data(8, ["ship", "dog", "cat"]), n_resamples=50)
    (path / "preprocessor_config.json").unlink()
    with pytest.raises(HFCompressError, match="no image processor"):
        pipeline_accuracy(path, _data(8, classes), n_resamples=50)
