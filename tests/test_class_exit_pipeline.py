"""Early exit end to end: conversion from transformers' ResNet, the threshold search, the CLI on CIFAR-10."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from hf_compress.early_exit.heads import default_exit_positions, from_hf_resnet, reattach_exits
from hf_compress.early_exit.search import ExitScores, collect_exit_scores, search_thresholds, simulate_exits
from hf_compress.errors import HFCompressError
from hf_compress.modeling.class_exit_resnet import ClassExitResNetConfig, ClassExitResNetForImageClassification

torch.set_num_threads(1)
CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _tiny_hf_resnet(layer_type: str = "basic", num_labels: int = 10, seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16] if layer_type == "basic" else [16, 32, 32], depths=[1, 2, 1],
        layer_type=layer_type, num_labels=num_labels, id2label={i: CIFAR_NAMES[i % 10] + str(i) for i in range(num_labels)},
    )
    model = ResNetForImageClassification(config)
    model.train()
    with torch.no_grad():  # non-trivial batch-norm statistics
        model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_from_hf_resnet_keeps_final_logits(layer_type):
    source = _tiny_hf_resnet(layer_type)
    model = from_hf_resnet(source, exit_positions=["stage1", "stage2.1"]).eval()
    assert model.config.exit_thresholds == [0.0, 0.0]
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = source(images).logits
        full = model(images, early_exit=False)
        early = model(images)
    assert torch.equal(full.logits, expected)
    assert torch.equal(early.logits, expected)
    assert early.exit_indices.tolist() == [2] * 6
    # the heads read the right widths: 8 (stage1) and 16 (stage2) channels pooled to 2x2
    assert [head.classifier.in_features for head in model.exit_heads] == (
        [8 * 4, 16 * 4] if layer_type == "basic" else [16 * 4, 32 * 4]
    )


def test_default_positions_and_reattach():
    assert default_exit_positions([9, 9, 9]) == ["stage1.5", "stage1", "stage2.5", "stage2", "stage3.5"]
    assert default_exit_positions([2, 2]) == ["stage1.1", "stage1", "stage2.1"]
    model = from_hf_resnet(_tiny_hf_resnet(), exit_positions=["stage1", "stage2.1"])
    moved = reattach_exits(model, exit_positions=["stage2.1", "stage2"])
    assert torch.equal(moved.exit_heads[0].classifier.weight, model.exit_heads[1].classifier.weight)
    assert torch.equal(moved.classifier[1].weight, model.classifier[1].weight)
    baseline = reattach_exits(model, exit_rule="confidence")
    assert baseline.config.exit_thresholds == [1.0, 1.0]
    assert not torch.equal(baseline.exit_heads[0].classifier.weight, model.exit_heads[0].classifier.weight)
    plain = reattach_exits(model, exit_positions=[])
    assert plain.config.exit_positions == [] and len(plain.exit_heads) == 0
    assert reattach_exits(plain).config.exit_positions == ["stage1", "stage2.1", "stage2"]
    with pytest.raises(HFCompressError, match="stage3 has blocks 1..1"):
        reattach_exits(model, exit_positions=["stage3.2"])


def _scores(exit_logits: list[list[list[float]]], final: list[list[float]], labels: list[int]) -> ExitScores:
    return ExitScores(
        exit_logits=[torch.tensor(e) for e in exit_logits], final_logits=torch.tensor(final),
        labels=torch.tensor(labels), unit_macs=[10, 100, 100], head_macs=[1, 1], classifier_macs=5, exit_units=[0, 1],
    )


def test_simulation_and_search_hand_computed():
    # 4 samples, 3 classes, exits after unit 0 and unit 1. Full network: 3 of 4 correct (sample 3 wrong).
    big, small = 4.0, -4.0
    exit0 = [[big, small, small], [big, 0.0, small], [small, big, 3.9], [small, small, big]]
    exit1 = [[big, small, small], [small, big, small], [small, big, small], [big, small, small]]
    final = [[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]]
    scores = _scores([exit0, exit1], final, [0, 1, 1, 2])
    # beta 0.5 at exit 0: sample 0 (0.018/0.982 < 0.5) and sample 3 stop; sample 1 keeps {0, 1}
    # (sigmoid(0) = 0.5 > 0.491); sample 2 keeps {1, 2}. Exit 1 off; final picks among the candidates.
    sim = simulate_exits(scores, [0.5, 0.0], "class_exclusion")
    assert sim.exit_indices.tolist() == [0, 2, 2, 0]
    assert sim.predictions.tolist() == [0, 1, 1, 2]
    assert sim.macs.tolist() == [11, 216, 216, 11]
    assert sim.accuracy == 1.0 and sim.mean_macs == (11 + 216 + 216 + 11) / 4
    # With both exits at beta 0.5, sample 1 stops at exit 1 (class 0 excluded), sample 2 too.
    both = simulate_exits(scores, [0.5, 0.5], "class_exclusion")
    assert both.exit_indices.tolist() == [0, 1, 1, 0] and both.macs.tolist() == [11, 112, 112, 11]
    # Tolerance 0: accuracy may not fall below 0.75. The cheapest such setting: beta_0 above 0.998 (sample 2's
    # 0.980 / 0.982) stops every sample at exit 0 (11 MACs): samples 0, 2 and 3 right, sample 1 wrong, 0.75.
    # (Thresholds are searched between the samples' own score ratios, not on a fixed grid of `step`.)
    search = search_thresholds(scores, "class_exclusion", tolerance=0.0, step=0.1)
    assert search.accuracy_full == 0.75 and search.accuracy == 0.75
    assert search.mean_macs == 11
    assert 0.998 < search.thresholds[0] < 1 and search.thresholds[1] == 0  # exit 1 off: its head would only cost
    final_sim = simulate_exits(scores, search.thresholds, "class_exclusion")
    assert final_sim.mean_macs == 11 and final_sim.accuracy == search.accuracy
    # Confidence rule: softmax of exit 0, sample 0 max prob ~0.9993 > 0.99 stops; threshold 1 disables.
    conf = simulate_exits(scores, [0.99, 1.0], "confidence")
    assert conf.exit_indices.tolist() == [0, 2, 2, 0]
    assert conf.predictions.tolist() == [0, 1, 1, 2]


def test_simulation_matches_batched_model():
    torch.manual_seed(0)
    config = ClassExitResNetConfig(
        num_labels=10, embedding_size=4, hidden_sizes=[4, 8], depths=[2, 2],
        exit_positions=["stem", "stage1.1", "stage1", "stage2.1"],
    )
    model = ClassExitResNetForImageClassification(config)
    with torch.no_grad():
        for head in model.exit_heads:
            head.classifier.weight.mul_(3.0)
    from hf_compress.data.images import ImageClassificationData

    data = ImageClassificationData(
        images=torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8), labels=torch.randint(0, 10, (64,)),
        class_names=CIFAR_NAMES,
    )
    scores = collect_exit_scores(model.eval(), data, batch_size=64)
    for rule, thresholds in [("class_exclusion", [0.3, 0.5, 0.6, 0.7]), ("confidence", [0.5, 0.3, 1.0, 0.2])]:
        model.config.exit_rule = rule
        model.config.exit_thresholds = thresholds
        sim = simulate_exits(scores, thresholds, rule)
        with torch.no_grad():
            out = model(next(data.batches(64))[0])
        assert len(set(out.exit_indices.tolist())) >= 2
        assert out.exit_indices.tolist() == sim.exit_indices.tolist()
        assert out.macs.tolist() == sim.macs.tolist()
        assert out.logits.argmax(1).tolist() == sim.predictions.tolist()


def _run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from hf_compress.cli import main

    monkeypatch.setattr(sys, "argv", ["hf-compress", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10")
def test_cli_end_to_end_on_cifar(tmp_path, monkeypatch, capsys):
    source = tmp_path / "resnet"
    _tiny_hf_resnet().save_pretrained(source)
    out = tmp_path / "exit"
    code, stdout, stderr = _run_cli(
        monkeypatch, capsys, "early-exit", str(source), str(out), "--dataset", "cifar10", "--tolerance", "0.05",
        "--exits", "stage1,stage2.1", "--epochs", "1", "--train-limit", "500", "--n-val", "200", "--test-limit", "200",
        "--batch-size", "100", "--step", "0.05", "--no-progress",
    )
    assert code == 0, stderr
    assert "saved" in stdout
    config = json.loads((out / "config.json").read_text())
    record = config["compression"]
    assert record["method"] == "class_exclusion_early_exit"
    assert record["thresholds"] == config["exit_thresholds"] and len(record["thresholds"]) == 2
    assert record["validation"]["accuracy_early_exit"] >= record["validation"]["accuracy_full"] - 0.05 - 1e-9
    assert config["id2label"]["0"] == "airplane" and config["image_size"] == 32
    assert (out / "preprocessor_config.json").exists() and (out / "modeling_class_exit_resnet.py").exists()
    assert not (tmp_path / ".exit.partial").exists()

    # Independent check of the recorded test figures: reload, rerun on the same 200 test images.
    from hf_compress.data.images import load_image_dataset

    model = ClassExitResNetForImageClassification.from_pretrained(out).eval()
    test = load_image_dataset("cifar10", "test", limit=200, seed=0)
    with torch.no_grad():
        result = model(next(test.batches(200))[0])
        full = model(next(test.batches(200))[0], early_exit=False)
    assert record["mean_macs"] == pytest.approx(result.macs.float().mean().item())
    assert record["accuracy_early_exit"] == pytest.approx((result.logits.argmax(1) == test.labels).float().mean().item())
    assert record["accuracy_full"] == pytest.approx((full.logits.argmax(1) == test.labels).float().mean().item())
    assert record["macs_full"] == model.full_macs(32, 32)
    shares = torch.bincount(result.exit_indices, minlength=3).float() / 200
    histogram = record["exit_histogram"]  # the config JSON sorts keys: compare by exit name
    assert [histogram[name] for name in ["stage1", "stage2.1", "final"]] == pytest.approx(shares.tolist())

    # The stock pipeline works on the checkpoint.
    from PIL import Image
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(out))
    image = Image.fromarray(test.images[0].permute(1, 2, 0).numpy())
    top = classifier(image, top_k=1)[0]
    assert top["label"] == CIFAR_NAMES[int(result.logits[0].argmax())]

    code, stdout, _ = _run_cli(
        monkeypatch, capsys, "exit-report", str(out), "--dataset", "cifar10", "--limit", "200", "--json", str(tmp_path / "r.json")
    )
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["mean_macs"] == pytest.approx(record["mean_macs"])
    assert report["accuracy"] == pytest.approx(record["accuracy_early_exit"])
    assert sum(row["samples"] for row in report["per_class"].values()) == 200
    assert "| airplane |" in stdout and "| **all** | 200 |" in stdout


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10")
def test_cli_frozen_backbone_keeps_the_source_network(tmp_path, monkeypatch, capsys):
    """`--frozen-backbone` trains the heads alone: with every exit off, the saved model computes the source's
    logits exactly, and the record says how it was trained."""
    source_model = _tiny_hf_resnet()
    source = tmp_path / "resnet"
    source_model.save_pretrained(source)
    out = tmp_path / "exit"
    code, _, stderr = _run_cli(
        monkeypatch, capsys, "early-exit", str(source), str(out), "--frozen-backbone", "--exits", "stage1",
        "--epochs", "1", "--lr", "0.1", "--train-limit", "300", "--n-val", "100", "--test-limit", "50",
        "--batch-size", "100", "--step", "0.1", "--no-progress",
    )
    assert code == 0, stderr
    record = json.loads((out / "config.json").read_text())["compression"]
    assert record["training"]["train_backbone"] is False and record["options"]["train_backbone"] is False
    model = ClassExitResNetForImageClassification.from_pretrained(out).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images, early_exit=False).logits, source_model(images).logits,
                                   rtol=1e-5, atol=1e-5)



def test_cli_bad_input(tmp_path, monkeypatch, capsys):
    import pandas as pd

    source = tmp_path / "resnet5"
    _tiny_hf_resnet(num_labels=5).save_pretrained(source)
    images = tmp_path / "unlabeled.parquet"
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    pd.DataFrame({"img": [{"bytes": buffer.getvalue(), "path": None}] * 20}).to_parquet(images)
    code, _, err = _run_cli(monkeypatch, capsys, "early-exit", str(source), str(tmp_path / "o"), "--dataset", str(images),
                            "--n-val", "5", "--no-progress")
    assert code == 2 and "no label column" in err
    if CIFAR.is_dir():
        code, _, err = _run_cli(monkeypatch, capsys, "early-exit", str(source), str(tmp_path / "o"), "--train-limit", "50",
                                "--n-val", "10", "--no-progress")
        assert code == 2 and "classifies 5 classes" in err and "dataset has 10" in err
        source10 = tmp_path / "resnet10"
        _tiny_hf_resnet().save_pretrained(source10)
        code, _, err = _run_cli(monkeypatch, capsys, "early-exit", str(source10), str(tmp_path / "o"), "--train-limit", "50",
                                "--n-val", "10", "--exits", "stage4", "--no-progress")
        assert code == 2 and "stage1..stage3" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("layout", [dict(), dict(shortcut_type="projection", stem_kernel_size=7, stem_stride=2, stem_pool=True)])
def test_from_pruned_cnn_keeps_final_logits(layout):
    from hf_compress.early_exit.heads import from_pruned_cnn
    from hf_compress.modeling.pruned_cnn import PrunedCNNConfig, PrunedCNNForImageClassification

    torch.manual_seed(0)
    config = PrunedCNNConfig(
        stem_width=4, hidden_sizes=[4, 8], stage_strides=[1, 2], block_widths=[[[4], [4]], [[8], [8]]], num_labels=10,
        **layout,
    )
    source = PrunedCNNForImageClassification(config)
    source.train()
    with torch.no_grad():
        source(torch.randn(8, 3, 16, 16))
    source.eval()
    model = from_pruned_cnn(source, exit_positions=["stage1.1", "stage2.1"]).eval()
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(images).logits, source(images).logits)
    pruned = PrunedCNNForImageClassification(PrunedCNNConfig(
        stem_width=4, hidden_sizes=[4, 8], stage_strides=[1, 2], block_widths=[[[2], [4]], [[8], [8]]], num_labels=10))
    with pytest.raises(HFCompressError, match="is pruned"):
        from_pruned_cnn(pruned)


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10")
def test_pipeline_resumes_after_training(tmp_path, monkeypatch):
    """A run that fails after joint training resumes at the search, without training again."""
    import hf_compress.early_exit.api as pipeline_module
    import hf_compress.vision.training as training_module
    from hf_compress.early_exit import EarlyExitConfig, add_early_exits

    source = tmp_path / "resnet"
    _tiny_hf_resnet().save_pretrained(source)
    options = EarlyExitConfig(exit_positions=["stage1"], epochs=1, batch_size=100, n_val=100, train_limit=300,
                              test_split=None, step=0.1)
    real_search = pipeline_module.search_thresholds

    def broken_search(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pipeline_module, "search_thresholds", broken_search)
    with pytest.raises(RuntimeError, match="interrupted"):
        add_early_exits(source, tmp_path / "out", options, progress=False)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial" / "hf_compress_stage.json").exists()
    trained = ClassExitResNetForImageClassification.from_pretrained(tmp_path / ".out.partial")

    def no_training(*args, **kwargs):
        raise AssertionError("training ran again")

    monkeypatch.setattr(pipeline_module, "search_thresholds", real_search)
    monkeypatch.setattr(training_module, "train_classifier", no_training)
    # The search's cost is a post-training setting: the trained stage is reused with the latency search.
    latency = dataclasses.replace(options, cost="latency")
    record = add_early_exits(source, tmp_path / "out", latency, progress=False).provenance
    assert record["options"]["cost"] == "latency"
    validation = record["validation"]
    assert 0 < validation["mean_latency_ns"] <= validation["latency_full_ns"]  # never dearer than no exit
    assert validation["mean_macs"] == record["mean_macs"] and record["mean_macs"] <= record["macs_full"] * 1.01
    saved = ClassExitResNetForImageClassification.from_pretrained(tmp_path / "out")
    assert torch.equal(saved.exit_heads[0].classifier.weight, trained.exit_heads[0].classifier.weight)
    assert record["dataset"] == "cifar10:validation" and record["exit_histogram"] is None
    assert not (tmp_path / ".out.partial").exists()
    # A stage trained with other settings is not reused.
    monkeypatch.setattr(pipeline_module, "search_thresholds", broken_search)
    monkeypatch.undo()
    monkeypatch.setattr(pipeline_module, "search_thresholds", broken_search)
    with pytest.raises(RuntimeError, match="interrupted"):
        add_early_exits(source, tmp_path / "out3", options, progress=False)
    monkeypatch.setattr(training_module, "train_classifier", no_training)
    with pytest.raises(AssertionError, match="training ran again"):
        add_early_exits(source, tmp_path / "out3", EarlyExitConfig(**{**options.__dict__, "epochs": 2}), progress=False)
