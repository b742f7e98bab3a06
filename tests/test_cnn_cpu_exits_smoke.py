"""Stage "exits" of the cifar-cpu benchmark end to end at toy scale (a narrow random ResNet-20 and a small random
dataset, paths under tmp_path): the JSON, the summary entries, the curves, the figures against an independent count of
the saved models' MACs and accuracy, and resuming."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_compress.data.images import ImageClassificationData

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
pytest.importorskip("matplotlib")
spec = importlib.util.spec_from_file_location("cnn_cpu_exits", REPO / "benchmarks" / "cnn_cpu_exits.py")
stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage)
torch.set_num_threads(1)  # two threads on a busy 2-core machine spin against each other

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SIZES = {"train": 160, "val": 80, "test": 72}


def _data(n: int, seed: int) -> ImageClassificationData:
    """Random 16x16 images whose mean colour depends on the label, so that the exits learn something."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    tint = torch.randint(0, 256, (10, 3, 1, 1), generator=torch.Generator().manual_seed(99)).float()
    noise = torch.randint(0, 256, (n, 3, 16, 16), generator=g).float()
    images = (0.5 * noise + 0.5 * tint[labels]).round().to(torch.uint8)
    return ImageClassificationData(images=images, labels=labels, class_names=NAMES)


def _splits(args):
    return _data(SIZES["train"], 1), _data(SIZES["val"], 2), _data(SIZES["test"], 3)


def _baseline(folder: Path) -> None:
    """A random narrow CIFAR ResNet-20 (PrunedCNN, the baseline stage's format) standing in for a trained one."""
    from hf_compress.modeling.pruned_cnn import PrunedCNNForImageClassification, resnet_cifar_config
    from hf_compress.vision.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = PrunedCNNForImageClassification(resnet_cifar_config(
        20, (4, 8, 8), id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)}))
    save_checkpoint(model.eval(), folder)


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    return parser.parse_args([
        "--seed", "2023", "--work-dir", str(tmp_path / "work"), "--baseline-dir", str(tmp_path / "baselines"),
        "--results-dir", str(tmp_path / "results"), "--train-limit", "240", "--val-size", "80", "--test-limit", "72",
        "--epochs", "2", "--lr", "0.05", "--tolerance", "0.05", "--tolerance", "0.2", "--step", "0.1",
        "--max-grid", "64", "--speed-rounds", "1", "--throughput-batch", "32", *extra,
    ])


def _counted(model, images: torch.Tensor) -> tuple[list[int], list[int]]:
    """MACs (torch's FLOP counter, 2 FLOPs per multiply-add) and prediction of each image run on its own."""
    macs, predictions = [], []
    for image in images:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            out = model(pixel_values=image[None])
        macs.append(counter.get_total_flops() // 2)
        predictions.append(int(out.logits.argmax(1)))
    return macs, predictions


@pytest.mark.parametrize("training", ["joint", "frozen"])
def test_exits_stage_end_to_end(tmp_path, monkeypatch, training):
    monkeypatch.setattr(stage, "_load_splits", _splits)
    _baseline(tmp_path / "baselines" / "resnet20-seed2023")
    report = stage.run(_args(tmp_path, "--training", training))
    results = tmp_path / "results"
    saved = json.loads((results / "cnn_cpu_exits.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["reduced"] and saved["scale"] == {"train_images": 160, "val_images": 80, "test_images": 72}
    assert saved["exit_positions"] == ["stage1.2", "stage1", "stage2.2", "stage2", "stage3.2"]
    rows = saved["rows"]
    assert sorted((r["rule"], r["tolerance"]) for r in rows) == [
        ("class_exclusion", 0.05), ("class_exclusion", 0.2), ("confidence", 0.05), ("confidence", 0.2)]

    test = _data(SIZES["test"], 3)
    images = next(test.batches(SIZES["test"]))[0]
    from hf_compress.modeling.class_exit_resnet import ClassExitResNetForImageClassification

    for row in rows:
        model = ClassExitResNetForImageClassification.from_pretrained(
            tmp_path / "work" / "exits-resnet20-seed2023" / training / "models" / row["rule"]).eval()
        # Independent count: every image through the saved model on its own, under torch's FLOP counter.
        model.config.exit_thresholds = [model.config.disabled_threshold] * 5
        full_macs, full_predictions = _counted(model, images)
        assert set(full_macs) == {row["macs_full"]}
        model.config.exit_thresholds = row["thresholds"]
        macs, predictions = _counted(model, images)
        assert row["mean_macs"] == pytest.approx(sum(macs) / len(macs), abs=1e-9)
        assert row["macs_reduction"] == pytest.approx(1 - sum(macs) / len(macs) / row["macs_full"], abs=1e-12)
        right = [p == int(y) for p, y in zip(predictions, test.labels)]
        full_right = [p == int(y) for p, y in zip(full_predictions, test.labels)]
        assert row["test_acc"] == pytest.approx(sum(right) / 72) and row["test_acc_full"] == pytest.approx(sum(full_right) / 72)
        errors = row["test_errors"]
        assert sum(right) == sum(full_right) - errors["lost_at_early_stops"] - errors["lost_to_excluded_classes"] + \
            errors["gained"]
        assert row["replay_test_acc"] == pytest.approx(row["test_acc"]) and row["replay_mean_macs"] == row["mean_macs"]
        assert 0 <= row["macs_reduction"] <= 1 and 0 <= row["test_acc"] <= 1 and row["speedup"] > 0
        assert row["val_accuracy"] >= row["val_accuracy_full"] - row["tolerance"] - 1e-9
        assert sum(row["exit_histogram"].values()) == pytest.approx(1.0)
        if training == "frozen":  # the full network is the baseline itself
            assert row["test_acc_full"] == row["baseline_test_acc"]
    for rule in ("class_exclusion", "confidence"):
        small, large = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["tolerance"])
        assert large["val_macs_reduction"] >= small["val_macs_reduction"]  # a larger tolerance is never dearer
        curve = saved["curves"]["2023"][rule]
        assert len(curve["uniform"]) == len(stage.UNIFORM[rule])
        # the validation front: cheapest first, each point more accurate than every cheaper one, up to at least the
        # full network's accuracy (every exit off is on the grid)
        saving = [p["val_macs_reduction"] for p in curve["front"]]
        accuracy = [p["val_accuracy"] for p in curve["front"]]
        assert saving == sorted(saving, reverse=True) and accuracy == sorted(set(accuracy))
        assert accuracy[-1] >= small["val_accuracy_full"]
        assert (results / f"cnn_cpu_exits_{rule}.png").stat().st_size > 0
    assert any(r["macs_reduction"] > 0 for r in rows)  # something was saved, so the counts above are not trivial

    summary = json.loads((results / "cnn_cpu_summary.json").read_text())["networks"]["resnet20"]
    for row in rows:
        key = f"exits_{row['rule']}_tol{row['tolerance']}"
        assert summary[f"{key}_macs_reduction"] == row["macs_reduction"]
        assert summary[f"{key}_test_acc_per_seed"] == {"2023": row["test_acc"]}
        assert summary[f"{key}_speedup"] == row["speedup"]
    assert "| class exclusion | 0.05 |" in (results / "cnn_cpu_exits.md").read_text()

    # A second run finds the finished seed under --work-dir: nothing is trained or measured again.
    def no_work(*args, **kwargs):
        raise AssertionError("ran again")

    monkeypatch.setattr(stage, "train_exits", no_work)
    monkeypatch.setattr(stage, "search_thresholds", no_work)
    again = stage.run(_args(tmp_path, "--training", training))
    assert again["rows"] == report["rows"]


def test_trained_models_are_reused(tmp_path, monkeypatch):
    """Interrupted after training, a rerun with other tolerances reuses the trained models (no training)."""
    monkeypatch.setattr(stage, "_load_splits", _splits)
    _baseline(tmp_path / "baselines" / "resnet20-seed2023")
    real_search = stage.search_thresholds

    def interrupted(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(stage, "search_thresholds", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        stage.run(_args(tmp_path, "--epochs", "1", "--rule", "confidence"))
    monkeypatch.setattr(stage, "search_thresholds", real_search)
    monkeypatch.setattr(stage, "train_exits", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
    report = stage.run(_args(tmp_path, "--epochs", "1", "--rule", "confidence", "--speed-rounds", "1"))
    assert {r["rule"] for r in report["rows"]} == {"confidence"}
    # The latency search reuses them too, and keeps its result beside the MAC search's.
    latency = stage.run(_args(tmp_path, "--epochs", "1", "--rule", "confidence", "--speed-rounds", "1",
                              "--cost", "latency", "--results-dir", str(tmp_path / "latency")))
    folder = tmp_path / "work" / "exits-resnet20-seed2023" / "joint"
    assert (folder / "result.json").is_file() and (folder / "result-latency.json").is_file()
    stored = json.loads((folder / "result-latency.json").read_text())
    assert stored["search_cost"] == "latency" and stored["settings"]["cost"] == "latency"
    measured = stored["costs_ns"]["confidence"]
    assert len(measured["heads"]) == len(report["rows"][0]["thresholds"]) and len(measured["units"]) > 1
    assert all(value >= 1 for value in measured["units"] + measured["heads"] + [measured["classifier"]])
    assert latency["budget"]["search_cost"] == "latency" and "least measured time" in (
        tmp_path / "latency" / "cnn_cpu_exits.md").read_text()


def test_reduced_run_refuses_the_protocol_results(tmp_path):
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    args = parser.parse_args(["--train-limit", "100", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="must not write the protocol's results"):
        stage.run(args)


def test_report_summary_rows_are_the_means_over_seeds():
    """benchmarks/report.py's README row for stage "exits": means over the seeds, from the rows as stored."""
    spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    rows = []
    for seed, (ce, cf) in {2023: ((0.10, 0.86, 1.02), (0.20, 0.85, 1.10)),
                           2024: ((0.14, 0.84, 1.04), (0.24, 0.87, 1.12))}.items():
        for rule, (saved, acc, speedup) in (("class_exclusion", ce), ("confidence", cf)):
            rows.append({"seed": seed, "rule": rule, "tolerance": 0.005, "macs_reduction": saved, "test_acc": acc,
                         "test_acc_full": 0.87, "speedup": speedup})
        rows.append({**rows[-1], "tolerance": 0.01, "macs_reduction": 0.9})  # another tolerance: not in the row
    exits = {"reduced": False, "rows": rows, "budget": {"training": "joint", "throughput_batch": 256}}
    [row] = report.cnn_cpu_exit_rows(exits)
    assert row[2] == "12.0% fewer MACs, 1.03x at batch 256, acc 87.0% -> 85.0%"
    assert row[3] == "max-softmax exits: 22.0% fewer MACs, 1.11x, acc 86.0%"
    assert row[4] == 'protocol "cifar-cpu", 2 seeds'
    assert report.cnn_cpu_exit_rows({**exits, "reduced": True}) == []


def test_report_stops_analysis_from_the_histograms():
    spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    positions = ["stage1.2", "stage1", "stage2.2", "stage2", "stage3.2"]

    def row(seed, rule, hist, lost):
        return {"seed": seed, "rule": rule, "tolerance": 0.005, "test_errors": {"lost_to_excluded_classes": lost},
                "exit_histogram": dict(zip([*positions, "final"], hist))}

    exits = {"exit_positions": positions, "rows": [
        row(2023, "class_exclusion", [0, 0, 0.1, 0.1, 0.6, 0.2], 30), row(2024, "class_exclusion", [0, 0, 0, 0.2, 0.7, 0.1], 50),
        row(2023, "confidence", [0.1, 0.1, 0.1, 0.1, 0.4, 0.2], 0), row(2024, "confidence", [0, 0.2, 0.2, 0.2, 0.3, 0.1], 0)],
        "head_val_accuracy": {"2023": {"class_exclusion": [0.4, 0.5, 0.6, 0.7, 0.8], "confidence": [0.4] * 5},
                              "2024": {"class_exclusion": [0.6, 0.5, 0.6, 0.7, 0.9], "confidence": [0.6] * 5}}}
    text = report.exit_stops_analysis(exits)
    # class exclusion: (0.2 + 0.2) / 2 = 20% before stage3, (0.6 + 0.7) / 2 = 65% at stage3.2, 40 images lost
    assert "class exclusion stops 20.0% of the test images at the exits before stage3" in text
    assert "65.0% at stage3.2, and loses 40 test images" in text and "reach 50%, 50%, 60%, 70%, 85%" in text
    assert "confidence stops 50.0% of the test images" in text and "Class exclusion stops fewer images early" in text
    swapped = {**exits, "rows": [{**r, "rule": {"confidence": "class_exclusion", "class_exclusion": "confidence"}[r["rule"]]}
                                 for r in exits["rows"]]}
    assert "stops fewer images early" not in report.exit_stops_analysis(swapped)


def test_report_exit_head_ablation_table_and_sentence():
    """One row per run and rule, sorted by training mode and pool size, the protocol's run last on the ablation's
    seeds: each head's accuracy and the MACs saved at 0.005; one sentence per training mode with two pool sizes."""
    spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    positions = ["stage1", "stage2"]

    def run(pool, training, saved_ce, saved_cf, heads, seeds=(2023,)):
        rows = [{"seed": seed, "rule": rule, "tolerance": tol, "macs_reduction": saved if tol == 0.005 else 0.99,
                 "test_acc": 0.85, "test_acc_full": 0.86}
                for seed in seeds for rule, saved in (("class_exclusion", saved_ce), ("confidence", saved_cf))
                for tol in (0.005, 0.01)]
        return {"budget": {"exit_pool_size": pool, "training": training, "epochs": 5}, "exit_positions": positions,
                "rules": ["class_exclusion", "confidence"], "rows": rows,
                "head_val_accuracy": {str(s): {"class_exclusion": heads, "confidence": heads} for s in seeds}}

    protocol = run(2, "joint", 0.12, 0.20, [0.4, 0.7], seeds=(2023, 2024))
    protocol["rows"] = [r if r["seed"] == 2023 else {**r, "macs_reduction": 0.5} for r in protocol["rows"]]
    text = report.exit_head_ablation({"cnn_cpu_exits_pool8_joint": run(8, "joint", 0.2, 0.3, [0.6, 0.8]),
                                      "cnn_cpu_exits_pool4": run(4, "frozen", 0.30, 0.35, [0.6, 0.8]),
                                      "cnn_cpu_exits_pool1": run(1, "frozen", 0.05, 0.15, [0.3, 0.7])}, protocol)
    lines = [line for line in text.splitlines() if line.startswith("| 1x1") or line.startswith("| ")
             and line.split(" | ")[0] in ("| 2x2", "| 4x4", "| 8x8")]
    assert [line.split(" | ")[:4] for line in lines][::2] == [
        ["| 1x1", "frozen, 5 epochs", "2023", "class exclusion"], ["| 4x4", "frozen, 5 epochs", "2023", "class exclusion"],
        ["| 8x8", "joint, 5 epochs", "2023", "class exclusion"], ["| 2x2", "joint, 5 epochs", "2023", "class exclusion"]]
    assert lines[0].split(" | ")[4:8] == ["30.0%", "70.0%", "5.0%", "-1.00"]
    # the protocol's run on seed 2023 only (its seed 2024 would read 50%), without a link
    assert lines[-2].split(" | ")[6] == "12.0%" and lines[-2].endswith("the protocol's run |")
    assert "at most 64 x 64 x 10 multiply-adds" in text
    assert ("Trained frozen, class exclusion saves 5.0% of the MACs with 1x1 heads and 30.0% with 4x4 heads; "
            "the confidence rule 15.0% and 35.0%.") in text
    assert text.endswith("Trained joint, class exclusion saves 12.0% of the MACs with 2x2 heads and 20.0% with 8x8 "
                         "heads; the confidence rule 20.0% and 30.0%.")
    assert report.exit_head_ablation({}) == ""


def test_report_compares_the_latency_search_with_the_mac_search():
    """Per rule and tolerance, the means over the seeds both runs have of MACs saved, accuracy change and speedup."""
    spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def run(speedups: dict, seeds, note=""):
        rows = [{"seed": seed, "rule": rule, "tolerance": 0.005, "macs_reduction": 0.10 + 0.01 * i,
                 "test_acc": 0.850 + 0.001 * i, "test_acc_full": 0.86, "speedup": speedups[rule] + 0.02 * i}
                for i, seed in enumerate(seeds) for rule in ("class_exclusion", "confidence")]
        return {"rules": ["class_exclusion", "confidence"], "tolerances": [0.005], "rows": rows, "note": note}

    protocol = run({"class_exclusion": 1.02, "confidence": 1.08}, (2023, 2024, 2025))
    latency = run({"class_exclusion": 1.07, "confidence": 1.10}, (2023, 2024), note="paused")
    text = report.exit_cost_comparison(latency, protocol)
    # Seeds 2023 and 2024 only: MACs (0.10 + 0.11) / 2, accuracy change (-1.0 - 0.9) / 2, speedups 1.03 and 1.08.
    assert "| class exclusion | 0.005 | 10.5% / -0.95 / 1.03x | 10.5% / -0.95 / 1.08x |" in text
    assert "| confidence | 0.005 | 10.5% / -0.95 / 1.09x | 10.5% / -0.95 / 1.11x |" in text
    assert "(seeds 2023, 2024)" in text and "Note: paused" in text
    assert "changes the speedup by +0.02x to +0.05x (mean +0.04x)" in text
    assert report.exit_cost_comparison(latency, {**protocol, "rows": []}) == ""
