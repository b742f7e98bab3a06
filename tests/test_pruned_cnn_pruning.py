"""Class-aware pruning: importance scores, selection, physical shrinking, L1 baseline, regularisers, loop, CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import randomize_bn
import transformers
from typer.testing import CliRunner

from hf_compress.errors import HFCompressError
from hf_compress.provenance import DataRef, SourceRef
from hf_compress.modeling.pruned_cnn import PrunedCNNConfig, PrunedCNNForImageClassification, vgg_cifar_config
from hf_compress.class_aware.config import ClassAwareConfig
from hf_compress.class_aware.loop import class_aware_prune
from hf_compress.vision.counting import count_params_and_macs
from hf_compress.data.images import LOCAL_DATA_DIR, ImageClassificationData
from hf_compress.class_aware.importance import class_importance, select_filters
from hf_compress.class_aware.shrink import l1_norm_keep, l1_prune_to_macs, prunable_layers, shrink
from hf_compress.class_aware.regularizers import l1_penalty, orthogonality_penalty

torch.set_num_threads(2)




def _images(n_per_class: int, classes: int, side: int, seed: int) -> ImageClassificationData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = torch.randint(0, 80, (len(labels), 3, side, side), generator=g, dtype=torch.uint8)
    images[torch.arange(len(labels)), labels % 3] += 170  # learnable: class = bright channel
    return ImageClassificationData(images, labels, [f"c{i}" for i in range(classes)])


# -- importance ----------------------------------------------------------------------------------------


def _finite_difference_taylor(model, x, label, layer_conv, width, eps=1e-6):
    """|mean(a * dL/da)| per filter from dL/d(eps) of scaling the filter's output by (1 + eps): an independent route."""
    sizes = {}
    scores = []
    for f in range(width):
        losses = []
        for sign in (1, -1):
            def hook(module, inputs, output, f=f, sign=sign):
                sizes["positions"] = output.shape[2] * output.shape[3]
                output = output.clone()
                output[:, f] *= 1 + sign * eps
                return output

            handle = layer_conv.register_forward_hook(hook)
            with torch.no_grad():
                logits = model(pixel_values=x).logits
            handle.remove()
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([label])))
        derivative = (losses[0] - losses[1]) / (2 * eps)  # = sum over positions of a * dL/da
        scores.append(abs(float(derivative)) / sizes["positions"])
    return scores


def test_importance_matches_a_hand_computation():
    torch.manual_seed(3)
    model = PrunedCNNForImageClassification(vgg_cifar_config([4, "M", 3], (), num_labels=2, image_size=4)).double().eval()
    randomize_bn(model)
    data = _images(3, 2, 4, seed=1)
    layers = prunable_layers(model)
    used_threshold, class_threshold = 1.0, 0.5
    expected_usage = {layer.name: torch.zeros(2, layer.width, dtype=torch.float64) for layer in layers}
    for i in range(len(data)):
        x = data.normalize(data.images[i : i + 1]).double()
        label = int(data.labels[i])
        for layer in layers:
            t = _finite_difference_taylor(model, x, label, layer.layer.conv, layer.width)
            mean = sum(t) / len(t)
            for f, value in enumerate(t):
                expected_usage[layer.name][label, f] += (value >= used_threshold * mean) / 3
    result = class_importance(model, data, images_per_class=3, used_threshold=used_threshold, class_threshold=class_threshold)
    for layer in layers:
        assert torch.allclose(result.usage[layer.name].double(), expected_usage[layer.name], atol=1e-9)
        expected_counts = (expected_usage[layer.name] >= class_threshold - 1e-9).sum(0)
        assert result.class_counts[layer.name].tolist() == expected_counts.tolist()
    # Selection: every filter important for <= 1 class goes, but a plain layer keeps one filter.
    keep, removed = select_filters(model, result, max_classes=1)
    for layer in layers:
        counts = result.class_counts[layer.name]
        expected_keep = [c for c in range(layer.width) if counts[c] > 1]
        if not expected_keep:  # the most used of the candidates stays
            expected_keep = [int(result.usage[layer.name].sum(0).argmax())]
        assert keep.get(layer.name, torch.arange(layer.width)).tolist() == expected_keep
    assert removed == sum(layer.width for layer in layers) - sum(len(keep.get(l.name, range(l.width))) for l in layers)


def test_selection_respects_the_per_iteration_budget():
    torch.manual_seed(0)
    model = PrunedCNNForImageClassification(vgg_cifar_config([8, 8], (), num_labels=2, image_size=4)).eval()
    importance = class_importance(model, _images(2, 2, 4, seed=0), images_per_class=2)
    _, removed = select_filters(model, importance, max_classes=2, max_fraction=0.25)
    assert removed == 4  # 25% of 16 filters, although every filter is a candidate with max_classes=2


# -- shrinking -----------------------------------------------------------------------------------------


def _silence(layer, channels):
    """Zero BN scale and shift of `channels`: after ReLU (or into a residual sum) they then contribute nothing."""
    layer.bn.weight.data[channels] = 0
    layer.bn.bias.data[channels] = 0


def test_shrinking_a_plain_net_keeps_the_kept_filters_outputs():
    torch.manual_seed(0)
    model = PrunedCNNForImageClassification(vgg_cifar_config([6, "M", 5, 4], (7,), num_labels=3, image_size=8)).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    keep = {"plain.0": torch.tensor([0, 2, 5]), "plain.2": torch.tensor([1, 3])}
    with torch.no_grad():
        small = shrink(model, keep).eval()
        # Kept filters of the first pruned layer: identical conv outputs.
        assert torch.equal(small.cnn.layers[0].conv(x), model.cnn.layers[0].conv(x)[:, [0, 2, 5]])
        # Once the removed channels are silent, the whole network computes the same logits.
        _silence(model.cnn.layers[0], [1, 3, 4])
        _silence(model.cnn.layers[2], [0, 2])
        small = shrink(model, keep).eval()
        assert torch.allclose(small(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-6)
    assert small.config.plain_layers == [3, "M", 5, 2]
    assert [tuple(layer.conv.weight.shape) for layer in small.cnn.layers] == [(3, 3, 3, 3), (5, 3, 3, 3), (2, 5, 3, 3)]
    assert small.classifier.hidden[0].weight.shape == (7, 2)
    counts = count_params_and_macs(small, (3, 8, 8))
    assert (counts.params, counts.macs) == (small.config.num_parameters, small.config.num_macs)
    with pytest.raises(HFCompressError, match="layer plain.1 with 0 channels; it must keep at least 1"):
        shrink(model, {"plain.1": torch.tensor([], dtype=torch.long)})


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_shrinking_a_resnet_removes_channels_and_whole_blocks(layer_type):
    torch.manual_seed(0)
    inner = [[6], [5], [4]] if layer_type == "basic" else [[6, 5], [5, 4], [4, 3]]
    config = PrunedCNNConfig(
        layer_type=layer_type, stem_width=8, hidden_sizes=[8, 16], stage_strides=[1, 2],
        block_widths=[[inner[0], inner[1]], [inner[2]]],
        shortcut_type="zero_pad" if layer_type == "basic" else "projection", num_labels=3, image_size=8,
    )
    model = PrunedCNNForImageClassification(config).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    # stage0.block1 loses its branch (identity shortcut -> the block disappears), stage1.block0 keeps 2 channels
    # (its branch stays), stage0.block0 keeps channels 1, 3, 4.
    keep = {"stage0.block0.conv0": torch.tensor([1, 3, 4]), "stage0.block1.conv0": torch.tensor([], dtype=torch.long),
            "stage1.block0.conv0": torch.tensor([0, 2])}
    with torch.no_grad():
        b00, b01, b10 = model.cnn.stages[0][0], model.cnn.stages[0][1], model.cnn.stages[1][0]
        _silence(b00.convs[0], [0, 2, 5])
        _silence(b01.convs[-1], list(range(8)))  # the branch adds zero
        _silence(b10.convs[0], [1, 3])
        small = shrink(model, keep).eval()
        assert torch.allclose(small(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-6)
    assert len(small.cnn.stages[0]) == 1 and len(small.cnn.stages[1]) == 1
    assert small.config.block_widths[0][0][0] == 3 and small.config.block_widths[1][0][0] == 2
    assert small.cnn.stages[0][0].convs[0].conv.weight.shape[0] == 3
    assert small.cnn.stages[0][0].convs[1].conv.weight.shape[1] == 3
    counts = count_params_and_macs(small, (3, 8, 8))
    assert (counts.params, counts.macs) == (small.config.num_parameters, small.config.num_macs)
    assert small.config.num_macs < model.config.num_macs


# -- L1 baseline and regularisers ----------------------------------------------------------------------


def test_l1_norm_keeps_the_largest_filters_and_matches_a_mac_target():
    model = PrunedCNNForImageClassification(vgg_cifar_config([4, 4], (), num_labels=2, image_size=8))
    with torch.no_grad():
        for f, scale in enumerate([0.1, 3.0, 0.5, 2.0]):
            model.cnn.layers[0].conv.weight[f] = scale
    keep = l1_norm_keep(model, 0.5)
    assert keep["plain.0"].tolist() == [1, 3]
    target = model.config.num_macs // 2
    small = l1_prune_to_macs(model, target)
    assert small.config.num_macs >= target
    # one more filter removed anywhere would go below the target
    assert min(shrink(small, {l.name: torch.arange(l.width - 1)}).config.num_macs for l in prunable_layers(small) if l.width > 1) < target


def test_regularisers_against_hand_values():
    conv = torch.nn.Conv2d(1, 2, 1, bias=False)
    conv.weight.data = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # parallel filters: both normalise to [1]
    assert float(orthogonality_penalty([conv]).detach()) == pytest.approx(2.0)  # off-diagonal 1 twice
    conv2 = torch.nn.Conv2d(2, 2, 1, bias=False)
    conv2.weight.data = torch.tensor([[3.0, 0.0], [0.0, -2.0]]).view(2, 2, 1, 1)
    assert float(orthogonality_penalty([conv2]).detach()) == pytest.approx(0.0)
    assert float(l1_penalty([conv, conv2]).detach()) == pytest.approx(3.0 + 5.0)


# -- the loop --------------------------------------------------------------------------------------------


def test_loop_saves_iterations_resumes_and_rejects_a_floor_above_baseline(tmp_path):
    torch.manual_seed(0)
    model = PrunedCNNForImageClassification(vgg_cifar_config([8, "M", 8], (), num_labels=3, image_size=8))
    train, val = _images(20, 3, 8, seed=0), _images(10, 3, 8, seed=1)
    from hf_compress.vision.training import evaluate_accuracy, train_classifier

    baseline = evaluate_accuracy(model, val)  # untrained: about one in three
    assert baseline < 0.9
    with pytest.raises(HFCompressError, match="above the model's own validation accuracy"):
        class_aware_prune(model, train, val, tmp_path / "bad", ClassAwareConfig(accuracy_floor=0.9), progress=False)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    train_classifier(model, train, epochs=4, lr=0.1, batch_size=20, progress=False)

    settings = ClassAwareConfig(accuracy_floor=0.0, max_classes=3, max_fraction=0.25, max_iterations=1,
                                retrain_epochs=1, batch_size=20, images_per_class=4)
    out = tmp_path / "run"
    first = class_aware_prune(model, train, val, out, settings, source=SourceRef("unit"),
                              data=[DataRef.of("train", "blobs", "train")], progress=False)
    assert [r["iteration"] for r in first.rows] == [0, 1] and first.rows[1]["filters_removed"] == 4
    assert first.rows[1]["macs"] < first.rows[0]["macs"]
    saved = transformers.AutoModelForImageClassification.from_pretrained(out)
    c = saved.config.compression
    assert c["method"] == "class_aware_pruning" and c["macs_after"] == saved.config.num_macs == first.rows[1]["macs"]
    assert c["macs_before"] == model.config.num_macs and c["source"]["model_id"] == "unit" and len(c["iterations"]) == 2
    stamp = os.stat(out / "iterations" / "iter_001" / "model.safetensors").st_mtime_ns

    settings.max_iterations = 2
    second = class_aware_prune(model, train, val, out, settings, progress=False)
    assert [r["iteration"] for r in second.rows] == [0, 1, 2]
    assert os.stat(out / "iterations" / "iter_001" / "model.safetensors").st_mtime_ns == stamp  # not redone
    assert second.rows[2]["macs"] < second.rows[1]["macs"]
    state = json.loads((out / "iterations" / "state.json").read_text())
    assert len(state["rows"]) == 3 and state["stop_reason"] == "reached 2 iterations"

    settings.accuracy_floor = 0.5
    with pytest.raises(HFCompressError, match="holds a run with accuracy floor 0.0"):
        class_aware_prune(model, train, val, out, settings, progress=False)
    assert sorted(p.name for p in (out / "iterations").iterdir()) == ["iter_000", "iter_001", "iter_002", "state.json"]


def test_loop_saves_the_smallest_iteration_meeting_the_floor_when_the_last_misses_it(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = PrunedCNNForImageClassification(vgg_cifar_config([8, "M", 8], (), num_labels=3, image_size=8))
    train, val = _images(4, 3, 8, seed=0), _images(2, 3, 8, seed=1)
    # Validation accuracies in call order: source 0.9, iteration 1 0.85 (meets 0.8), iteration 2 0.7 (misses it).
    scripted = iter([0.9, 0.85, 0.7])
    monkeypatch.setattr("hf_compress.class_aware.loop.evaluate_accuracy", lambda *args, **kwargs: next(scripted))
    config = ClassAwareConfig(accuracy_floor=0.8, max_classes=3, max_fraction=0.25, max_iterations=5,
                              retrain_epochs=0, batch_size=4, images_per_class=2)
    out = tmp_path / "run"
    result = class_aware_prune(model, train, val, out, config, progress=False)
    rows = result.rows
    assert [r["meets_floor"] for r in rows] == [True, True, False]
    assert rows[2]["macs"] < rows[1]["macs"] < rows[0]["macs"]
    assert result.stop_reason == "accuracy 0.7000 fell below the floor 0.8000" and result.best_iteration == 1
    saved = transformers.AutoModelForImageClassification.from_pretrained(out)
    assert saved.config.num_macs == rows[1]["macs"] and saved.config.compression["best_iteration"] == 1
    assert saved.config.compression["macs_after"] == rows[1]["macs"] and saved.config.compression["accuracy_after"] == 0.85
    iteration_1 = PrunedCNNForImageClassification.from_pretrained(out / "iterations" / "iter_001").state_dict()
    assert all(torch.equal(value, iteration_1[name]) for name, value in saved.state_dict().items())


@pytest.mark.skipif(not (LOCAL_DATA_DIR / "cifar10").exists(), reason="local CIFAR-10 copy missing")
def test_cli_trains_and_prunes_a_few_hundred_cifar_images(tmp_path):
    from hf_compress.cli import app

    config = PrunedCNNConfig(stem_width=4, hidden_sizes=[4, 8, 16], stage_strides=[1, 2, 2],
                             block_widths=[[[4]], [[8]], [[16]]], num_labels=10)
    config.to_json_file(tmp_path / "tiny.json")
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "tiny.json"), str(tmp_path / "base"), "--dataset", "cifar10",
                                 "--limit", "200", "--eval-limit", "50", "--epochs", "1", "--batch-size", "50"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((tmp_path / "base" / "training_summary.json").read_text())
    assert summary["train_images"] == 200 and 0 <= summary["test_accuracy"] <= 1
    def prune_args(output, floor):
        return ["prune", str(tmp_path / "base"), str(tmp_path / output), "--dataset", "cifar10", "--limit", "200",
                "--val-size", "100", "--eval-limit", "50", "--accuracy-floor", floor, "--max-iterations", "1",
                "--retrain-epochs", "1", "--images-per-class", "4", "--max-classes", "10", "--max-fraction", "0.25",
                "--batch-size", "50"]

    args = prune_args("pruned", "0.01")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "| iteration | params | MACs |" in result.output and "stopped: reached 1 iterations" in result.output
    pruned = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "pruned")
    assert pruned.config.id2label[0] == "airplane"
    assert pruned.config.compression["macs_after"] == pruned.config.num_macs < config.num_macs
    assert pruned.config.compression["iterations"][1]["filters_removed"] == 7  # 25% of the 28 prunable filters
    # Bad input: a floor above the baseline, on a fresh output: a clear error and nothing written.
    result = runner.invoke(app, prune_args("other", "100"))
    assert isinstance(result.exception, HFCompressError) and "above the model's own validation accuracy" in str(result.exception)
    assert not (tmp_path / "other" / "config.json").exists()
