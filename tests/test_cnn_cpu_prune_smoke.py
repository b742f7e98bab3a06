"""Stage "prune" of the cifar-cpu benchmark end to end at tiny scale: a narrow ResNet-20 baseline, a few hundred
CIFAR-10 images, one iteration of one epoch; then a rerun that resumes everything from the work folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from hf_compress.data.images import LOCAL_DATA_DIR, load_image_dataset, train_val_split
from hf_compress.modeling.pruned_cnn import PrunedCNNForImageClassification, resnet_cifar_config
from hf_compress.vision.checkpoint import save_checkpoint
from hf_compress.vision.counting import count_params_and_macs
from hf_compress.vision.training import train_classifier

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

pytestmark = pytest.mark.skipif(not (LOCAL_DATA_DIR / "cifar10").exists(), reason="local CIFAR-10 copy missing")
pytest.importorskip("evaluate")
pytest.importorskip("matplotlib")
torch.set_num_threads(2)

TRAIN, VAL, TEST = 500, 100, 100


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    import cnn_cpu_prune

    # As bench_cnn_cpu.py builds its parser: --seed, --work-dir and --note are its own; the stage adds the rest.
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["baseline", "prune"])
    parser.add_argument("--seed", type=int, action="append")
    parser.add_argument("--work-dir", default="unused")
    parser.add_argument("--note", default="")
    cnn_cpu_prune.add_arguments(parser)
    return parser.parse_args([
        "prune", "--seed", "2023", "--work-dir", str(tmp_path / "work"), "--baseline-dir", str(tmp_path / "baselines"),
        "--results-dir", str(tmp_path / "results"), "--train-limit", str(TRAIN + VAL), "--val-size", str(VAL),
        "--test-limit", str(TEST), "--iterations", "1", "--retrain-epochs", "1", "--max-fraction", "0.3",
        "--images-per-class", "4", "--bootstrap-resamples", "200", "--floor-drop", "1.0", *extra,
    ])


def _baseline(tmp_path: Path) -> PrunedCNNForImageClassification:
    """A narrow ResNet-20 trained for one epoch on the smoke run's own train split, saved as stage 'baseline' does."""
    train_all = load_image_dataset("cifar10", "train", limit=TRAIN + VAL, seed=2023)
    train, _ = train_val_split(train_all, n_val=VAL, seed=2023)
    labels = train.id2label()
    torch.manual_seed(2023)
    model = PrunedCNNForImageClassification(resnet_cifar_config(
        20, (4, 8, 8), id2label=labels, label2id={v: k for k, v in labels.items()}))
    train_classifier(model, train, epochs=1, lr=0.05, batch_size=64, progress=False, seed=2023)
    save_checkpoint(model, tmp_path / "baselines" / "resnet20-seed2023", mean=train.mean, std=train.std)
    return model


def test_prune_stage_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    import cnn_cpu_prune

    baseline = _baseline(tmp_path)
    report = cnn_cpu_prune.run(_args(tmp_path))
    results = tmp_path / "results"
    assert report["reduced"] and report["scale"] == {"train_images": TRAIN, "val_images": VAL, "test_images": TEST}
    rows = {r["method"]: r for r in report["rows"]}
    assert sorted(rows) == ["baseline", "class_aware", "l1", "taylor"] and {r["seed"] for r in rows.values()} == {2023}
    base, ca = rows["baseline"], rows["class_aware"]
    # Every step ran on this machine, in the precision it multiplies natively.
    from hf_compress.device import native_bfloat16

    assert {r["precision"] for r in rows.values()} == {"bfloat16" if native_bfloat16(torch.device("cpu")) else "float32"}
    # A result whose steps ran on machines of different precision says so.
    assert cnn_cpu_prune._precisions({"precision": "float32"}, {"precision": "bfloat16"}, {}) == (
        "bfloat16, float32, unrecorded")
    counts = count_params_and_macs(baseline)
    assert (base["macs"], base["params"]) == (counts.macs, counts.params)

    # Class-aware: one iteration, kept (floor 0), smaller than the baseline; its curve starts at the baseline.
    assert ca["best_iteration"] == 1 and [c["iteration"] for c in ca["curve"]] == [0, 1]
    assert ca["curve"][0]["macs"] == base["macs"] and ca["curve"][1]["macs"] == ca["macs"] < base["macs"]
    for method in ("class_aware", "l1", "taylor"):
        row = rows[method]
        assert 0 <= row["macs_reduction"] <= 1 and 0 <= row["params_reduction"] <= 1
        assert row["macs_reduction"] == pytest.approx(1 - row["macs"] / base["macs"])
        assert row["retrain_epochs"] == 1  # the same budget for every method
        assert row["test_acc_ci"][0] <= row["test_acc"] <= row["test_acc_ci"][1]
        # The pipeline's accuracy is evaluate_accuracy's on the same images (float32 here), up to one image.
        assert abs(row["test_acc"] - row["test_acc_direct"]) <= 1 / TEST + 1e-9
        saved = PrunedCNNForImageClassification.from_pretrained(results / "cnn_cpu" /
                                                                f"resnet20-seed2023-{method.replace('_', '-')}")
        assert saved.config.num_macs == row["macs"] == count_params_and_macs(saved).macs
    # Equal MACs: the baselines are pruned to the closest count at or above the class-aware one. Global Taylor ranking
    # lands within one filter; uniform L1 moves every layer at once, coarse at these tiny widths.
    assert ca["macs"] <= rows["taylor"]["macs"] <= 1.05 * ca["macs"]
    assert ca["macs"] <= rows["l1"]["macs"] <= 1.25 * ca["macs"]
    saved_ca = PrunedCNNForImageClassification.from_pretrained(results / "cnn_cpu" / "resnet20-seed2023-class-aware")
    assert saved_ca.config.compression["method"] == "class_aware_pruning"
    assert saved_ca.config.compression["macs_after"] == ca["macs"]

    # Written files: JSON, markdown, curve, summary entries (fractions).
    assert json.loads((results / "cnn_cpu_prune.json").read_text())["rows"] == report["rows"]
    markdown = (results / "cnn_cpu_prune.md").read_text()
    assert "REDUCED" in markdown and "class-aware" in markdown and "plain Taylor" in markdown
    assert (results / "cnn_cpu_prune_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((results / "cnn_cpu_summary.json").read_text())["networks"]["resnet20"]
    for method in ("class_aware", "l1", "taylor"):
        assert summary[f"{method}_macs_reduction"] == pytest.approx(rows[method]["macs_reduction"])
        assert summary[f"{method}_test_acc_per_seed"] == {"2023": rows[method]["test_acc"]}
        assert 0 <= summary[f"{method}_params_reduction"] <= 1

    # The work folder keeps only what resuming and the results read: states and the retrained networks.
    work = tmp_path / "work" / "prune-resnet20-seed2023"
    assert sorted(str(p.relative_to(work)) for p in work.glob("*/**/model.safetensors")) == [
        "class_aware/iter_001/model/model.safetensors", "l1/model/model.safetensors",
        "taylor/model/model.safetensors"]
    assert not list(work.rglob("training_state*")) and not list(work.rglob("pruned"))

    # A rerun finds every step finished in the work folder: no training, the same rows.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(cnn_cpu_prune, "train_classifier", no_training)
    # Another note on the rerun does not rewrite what the rows say of their measurement.
    again = cnn_cpu_prune.run(_args(tmp_path, "--note", "a later reading"))
    assert again["rows"] == report["rows"] and {r["note"] for r in again["rows"]} == {""}
    # A state from before the note was recorded keeps its stored row's note, not the rerun's.
    state_file = work / "l1" / "state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("measured") == {"device": rows["l1"]["device"], "note": ""}
    state_file.write_text(json.dumps(state))
    stored = json.loads((results / "cnn_cpu_prune.json").read_text())
    next(r for r in stored["rows"] if r["method"] == "l1")["note"] = "as stored"
    (results / "cnn_cpu_prune.json").write_text(json.dumps(stored))
    legacy = {r["method"]: r["note"] for r in cnn_cpu_prune.run(_args(tmp_path, "--note", "a later reading"))["rows"]}
    assert legacy == {"baseline": "", "class_aware": "", "l1": "as stored", "taylor": ""}
    # Other settings are refused rather than mixed with the stored run.
    with pytest.raises(Exception, match="other settings"):
        cnn_cpu_prune.run(_args(tmp_path, "--max-fraction", "0.2"))


def test_a_reduced_run_does_not_write_the_protocol_results(tmp_path):
    import cnn_cpu_prune

    args = _args(tmp_path)
    args.results_dir = None
    with pytest.raises(SystemExit, match="--results-dir"):
        cnn_cpu_prune.run(args)


def test_class_aware_loop_prunes_past_a_floor_miss_as_the_paper_does(tmp_path, monkeypatch):
    """The paper's loop runs until no filter can be removed; a validation accuracy below the floor does not stop it,
    and the result is the smallest iteration that meets the floor (here the last, after a miss at iteration 1)."""
    import cnn_cpu_prune
    from hf_compress.class_aware.config import ClassAwareConfig

    scripted = {1: 0.70, 2: 0.86, 3: 0.84}  # validation accuracies after retraining; floor 0.85
    calls = []

    def fake_iteration(run, config, model, iteration, folder, loss_fn):
        calls.append(iteration)
        if iteration == 4:
            return None  # no filter left to remove
        row = {"iteration": iteration, "params": 100 - iteration, "macs": 1000 - 100 * iteration, "filters_removed": 5,
               "val_accuracy": scripted[iteration], "test_accuracy": scripted[iteration],
               "meets_floor": scripted[iteration] >= config.accuracy_floor}
        (folder / "model").mkdir(parents=True)  # where the real iteration saves its network
        return model, row

    class FakeRun:
        def seed_dir(self, seed):
            return tmp_path / "work"

        def scale(self):
            return {"train_images": 1}

        def load_baseline(self, seed):
            return "baseline network"

        def measured(self):
            return {"device": "test", "note": ""}

    monkeypatch.setattr(cnn_cpu_prune, "_class_aware_iteration", fake_iteration)
    base = {"params": 100, "macs": 1000, "val_acc": 0.86, "test_acc": 0.86}
    config = ClassAwareConfig(accuracy_floor=0.85, max_iterations=10, retrain_epochs=2)
    state = cnn_cpu_prune._class_aware(FakeRun(), 2023, config, base)
    assert calls == [1, 2, 3, 4]
    assert [r["meets_floor"] for r in state.get("rows")] == [True, False, True, False]
    assert state.get("stop_reason") == "no filter can be removed" and state.get("best_iteration") == 2
    # Only the networks of the best (2) and the last (3) iteration stay: the rest is removed as the loop goes.
    assert sorted(p.parent.name for p in (tmp_path / "work" / "class_aware").glob("iter_*/model")) == [
        "iter_002", "iter_003"]
    # The iteration budget stops it too; a finished run is read back, not run again.
    config.max_iterations = 2
    calls.clear()
    other = tmp_path / "budget"
    FakeRun.seed_dir = lambda self, seed: other
    state = cnn_cpu_prune._class_aware(FakeRun(), 2023, config, base)
    assert calls == [1, 2] and state.get("stop_reason") == "reached 2 iterations" and state.get("best_iteration") == 2
    calls.clear()
    assert cnn_cpu_prune._class_aware(FakeRun(), 2023, config, base).get("rows") == state.get("rows") and calls == []


def test_each_seed_is_written_when_it_finishes(tmp_path, monkeypatch):
    """The results are written after every seed, so that the first seed's rows are stored while the second runs;
    the comparisons beyond the floor come after all of them."""
    import cnn_cpu_prune

    written = []
    monkeypatch.setattr(cnn_cpu_prune, "_load_splits", lambda args: (None, None, None))
    monkeypatch.setattr(cnn_cpu_prune, "_seed_rows", lambda run, seed, methods: [{"seed": seed}])
    monkeypatch.setattr(cnn_cpu_prune, "_point_rows", lambda run, seed, methods: [{"seed": seed, "point": "p"}])
    monkeypatch.setattr(cnn_cpu_prune, "_write_outputs",
                        lambda run, rows, points=(): written.append((rows, points)) or {"rows": rows})
    args = _args(tmp_path)
    args.seed = [2023, 2024]
    cnn_cpu_prune.run(args)
    # Every seed's result first, then the comparisons beyond the floor.
    assert written == [([{"seed": 2023}], ()), ([{"seed": 2024}], ()),
                       ([], [{"seed": 2023, "point": "p"}]), ([], [{"seed": 2024, "point": "p"}])]


def test_methods_are_also_compared_beyond_the_floor(tmp_path, monkeypatch):
    """With the result at iteration 2 (floor 0), the first iteration removing at least 1% of the MACs is iteration 1:
    the one-shot baselines are pruned to its MACs, retrained for its epochs, and reported beside it as `points`."""
    import cnn_cpu_prune
    from hf_compress.vision.training import evaluate_accuracy

    _baseline(tmp_path)
    args = _args(tmp_path, "--iterations", "2", "--compare-at", "0.01")
    report = cnn_cpu_prune.run(args)
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["class_aware"]["best_iteration"] == 2 and rows["l1"]["retrain_epochs"] == 2
    points = {r["method"]: r for r in report["points"]}
    assert sorted(points) == ["class_aware", "l1", "taylor"] and {r["point"] for r in points.values()} == {"iteration 1"}
    first = next(c for c in rows["class_aware"]["curve"] if c["iteration"] == 1)
    ca = points["class_aware"]
    assert (ca["macs"], ca["test_acc_direct"], ca["val_acc"]) == (first["macs"], first["test_acc"], first["val_acc"])
    base = rows["baseline"]
    _, _, test = cnn_cpu_prune._load_splits(args)
    work = tmp_path / "work" / "prune-resnet20-seed2023"
    for method in ("l1", "taylor"):
        point = points[method]
        assert point["retrain_epochs"] == 1 and first["macs"] <= point["macs"] <= 1.25 * first["macs"]
        assert point["test_acc_change_direct"] == pytest.approx(point["test_acc_direct"] - base["test_acc_direct"])
        # The accuracy is the saved network's, recomputed here.
        model = PrunedCNNForImageClassification.from_pretrained(work / f"{method}-iter001" / "model").eval()
        assert model.config.num_macs == point["macs"]
        assert evaluate_accuracy(model, test, bf16=point["precision"] == "bfloat16") == pytest.approx(
            point["test_acc_direct"])
    markdown = (tmp_path / "results" / "cnn_cpu_prune.md").read_text()
    assert "Beyond the floor" in markdown and "Mean over seeds 2023: class-aware" in markdown
    assert json.loads((tmp_path / "results" / "cnn_cpu_prune.json").read_text())["points"] == report["points"]

    # A rerun reads everything back.
    monkeypatch.setattr(cnn_cpu_prune, "train_classifier", lambda *a, **k: pytest.fail("trained again"))
    assert cnn_cpu_prune.run(_args(tmp_path, "--iterations", "2", "--compare-at", "0.01"))["points"] == report["points"]


def test_a_difference_is_called_only_beyond_the_noise():
    import cnn_cpu_prune

    # Two accuracies with standard errors of 0.33 points: the difference's 95% half-width is 1.96 * sqrt(2) * 0.33.
    assert cnn_cpu_prune._verdict(0.0001, 0.0033, 0.0033) == "within the noise, +-0.91 points"
    assert cnn_cpu_prune._verdict(0.012, 0.0033, 0.0033) == "ahead, beyond the noise of +-0.91 points"
    assert cnn_cpu_prune._verdict(-0.012, 0.0033, 0.0033) == "behind, beyond the noise of +-0.91 points"
