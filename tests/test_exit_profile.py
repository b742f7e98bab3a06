"""The early-exit time profile (`benchmarks/cnn_cpu_exit_profile.py`): what its hooks count and how it splits time."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO
from hf_compress.data.images import ImageClassificationData
from hf_compress.modeling.class_exit_resnet import ClassExitResNetConfig, ClassExitResNetForImageClassification

torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("cnn_cpu_exit_profile", REPO / "benchmarks" / "cnn_cpu_exit_profile.py")
profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile)


def _model_and_data() -> tuple[ClassExitResNetForImageClassification, ImageClassificationData, list[float]]:
    torch.manual_seed(0)
    config = ClassExitResNetConfig(num_labels=5, embedding_size=4, hidden_sizes=[4, 8], depths=[2, 2],
                                   exit_positions=["stem", "stage1", "stage2.1"], exit_pool_size=2,
                                   exit_rule="confidence", exit_thresholds=[1.0, 1.0, 1.0])
    model = ClassExitResNetForImageClassification(config).eval()
    for head in model.exit_heads:  # sharper heads than at initialisation, so that confidences spread
        head.classifier.weight.data.mul_(4)
    generator = torch.Generator().manual_seed(1)
    data = ImageClassificationData(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=generator),
                                   torch.randint(0, 5, (40,), generator=generator), [str(k) for k in range(5)])
    with torch.no_grad():
        images = next(data.batches(len(data)))[0]
        exit_logits = model(pixel_values=images, early_exit=False).exit_logits
    # Thresholds at the confidences' 60th / 70th / 50th percentiles: every exit stops some samples.
    thresholds = [float(logits.softmax(1).max(1).values.quantile(q)) for logits, q in zip(exit_logits, (0.6, 0.7, 0.5))]
    return model, data, thresholds


def test_hooks_count_the_images_each_unit_and_head_processes():
    model, data, thresholds = _model_and_data()
    measured = profile.timed_inference([("full", model, [1.0, 1.0, 1.0]), ("exits", model, thresholds)], data,
                                       batch_size=16, rounds=2, module_times=True)
    with torch.no_grad():
        model.config.exit_thresholds = thresholds
        out = [model(pixel_values=images) for images, _ in data.batches(16)]
    exit_indices = torch.cat([o.exit_indices for o in out])
    assert 0 < int((exit_indices < 3).sum()) < len(data)  # some samples leave early, some do not
    units = list(model.resnet.units())
    # A sample that leaves at exit e ran the units up to exit e's; one reaching the end (index 3) ran them all.
    reach = [model.exit_units[int(e)] if int(e) < 3 else len(units) - 1 for e in exit_indices]
    for unit in range(len(units)):
        expected = 2 * sum(1 for last in reach if last >= unit)
        assert measured["exits"]["module_images"][f"unit{unit}"] == expected
        assert measured["full"]["module_images"][f"unit{unit}"] == 2 * len(data)
    for head in range(3):
        assert measured["exits"]["module_images"][f"head{head}"] == 2 * int((exit_indices >= head).sum())
    assert measured["exits"]["module_images"].get("final_linear", 0) == 2 * int((exit_indices == 3).sum())
    assert measured["exits"]["mean_macs"] == pytest.approx(float(torch.cat([o.macs for o in out]).double().mean()))
    # Disabled exits (confidence threshold 1.0) evaluate no head.
    assert not any(key.startswith("head") for key in measured["full"]["module_images"])
    assert all(measured[name]["wall_s"] >= sum(measured[name]["seconds"].values()) for name in measured)
    assert torch.equal(measured["exits"]["exit_indices"], exit_indices)
    assert measured["exits"]["images_per_s"] == pytest.approx(2 * len(data) / measured["exits"]["wall_s"])


def test_only_the_timed_batches_are_charged_to_the_units():
    """With `max_batches`, the first pass still runs every batch (predictions and MACs of the whole set), but the
    module times and images count the timed batches only."""
    model, data, thresholds = _model_and_data()
    measured = profile.timed_inference([("exits", model, thresholds)], data, batch_size=16, rounds=3, max_batches=1,
                                       module_times=True)["exits"]
    assert measured["timed_images"] == 3 * 16 and measured["module_images"]["unit0"] == 3 * 16
    assert len(measured["exit_indices"]) == len(data)


def test_analyse_splits_the_time_saved():
    full = {"wall_s": 4.0, "mean_macs": 100.0, "seconds": {"unit0": 1.0, "unit1": 2.0, "final_linear": 0.5},
            "module_images": {"unit0": 10, "unit1": 10, "final_linear": 10}}
    row = {"wall_s": 2.5, "mean_macs": 70.0, "seconds": {"unit0": 1.0, "unit1": 0.8, "head0": 0.2, "final_linear": 0.3},
           "module_images": {"unit0": 10, "unit1": 5, "head0": 10, "final_linear": 5}}
    split = profile.analyse(full, row)
    assert split["macs_saved"] == pytest.approx(0.3)
    assert split["units_predicted"] == pytest.approx(2.0 / 10 * 5 / 4.0)  # unit1's per-image time x 5 skipped
    assert split["units_measured"] == pytest.approx((3.0 - 1.8) / 4.0)
    assert split["heads"] == pytest.approx(0.2 / 4.0)
    # Everything but units and heads: 2.5 - 1.8 - 0.2 in the row against 4.0 - 3.0 in the full network.
    assert split["rest"] == pytest.approx((0.5 - 1.0) / 4.0)
    assert split["measured"] == pytest.approx(1 - 2.5 / 4.0)
    assert split["speedup"] == pytest.approx(4.0 / 2.5)
    # The final classifier's saving is part of the rest, so the parts add up: units - heads - rest = measured.
    assert split["units_measured"] - split["heads"] - split["rest"] == pytest.approx(split["measured"])
    assert split["unit_images_share"] == [1.0, 0.5]
