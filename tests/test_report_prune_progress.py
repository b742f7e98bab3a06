"""benchmarks/report.py's view of an unfinished prune stage: the steps its work folder holds, seed by seed."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO

spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def _write(path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _work(tmp_path):
    seed = tmp_path / "prune-resnet20-seed7"
    _write(seed / "baseline" / "state.json", {"settings": {}, "row": {"params": 1000, "macs": 4000, "val_acc": 0.8,
                                                                      "test_acc": 0.81}})
    rows = [{"iteration": 0, "params": 1000, "macs": 4000, "val_accuracy": 0.8, "test_accuracy": 0.81,
             "meets_floor": True},
            {"iteration": 1, "params": 900, "macs": 3000, "val_accuracy": 0.795, "test_accuracy": 0.8123,
             "meets_floor": True},
            {"iteration": 2, "params": 700, "macs": 2000, "val_accuracy": 0.78, "test_accuracy": 0.79,
             "meets_floor": False}]
    _write(seed / "class_aware" / "state.json", {"settings": {"config": {"accuracy_floor": 0.79}}, "rows": rows})
    _write(seed / "l1" / "state.json", {"settings": {"epochs": 8}, "row": {
        "params": 850, "macs": 3010, "val_accuracy": 0.77, "test_accuracy": 0.7888}})
    _write(seed / "l1-iter002" / "state.json", {"settings": {"epochs": 16}, "row": {
        "params": 700, "macs": 2000, "val_accuracy": 0.75, "test_accuracy": 0.76}})
    return tmp_path


def test_progress_lists_each_finished_step_against_the_baseline(tmp_path):
    text = report.prune_progress(_work(tmp_path), None)
    lines = [line for line in text.splitlines() if line.startswith("| 7 |")]
    assert lines == [
        "| 7 | baseline | - | - | - | 80.00% | - | 81.00% | - |",
        "| 7 | class-aware | 1 | 25.0% | 10.0% | 79.50% | 79.00% (met) | 81.23% | +0.23 pt |",
        "| 7 | class-aware | 2 | 50.0% | 30.0% | 78.00% | 79.00% (missed) | 79.00% | -2.00 pt |",
        "| 7 | L1-norm | 8 epochs | 24.8% | 15.0% | 77.00% | - | 78.88% | -2.12 pt |",
        "| 7 | L1-norm at iteration 2 | 16 epochs | 50.0% | 30.0% | 75.00% | - | 76.00% | -5.00 pt |",
    ]
    assert "- seed 7: class-aware pruning is still running." in text


def test_progress_names_the_result_once_the_loop_stopped_and_drops_seeds_with_results(tmp_path):
    work = _work(tmp_path)
    state = json.loads((work / "prune-resnet20-seed7" / "class_aware" / "state.json").read_text())
    state.update(stop_reason="reached 2 iterations", best_iteration=1)
    _write(work / "prune-resnet20-seed7" / "class_aware" / "state.json", state)
    assert ("seed 7: class-aware pruning stopped (reached 2 iterations); the result is iteration 1"
            in report.prune_progress(work, None))
    # Once the stage wrote a seed's rows, its work folder is no longer shown; nothing left means no section.
    assert report.prune_progress(work, {"rows": [{"seed": 7, "method": "baseline"}]}) == ""
    assert report.prune_progress(tmp_path / "absent", None) == ""


def _stage_row(seed: int, method: str, macs_reduction: float, test_acc: float) -> dict:
    return {"seed": seed, "method": method, "macs_reduction": macs_reduction, "test_acc": test_acc}


def test_summary_row_of_the_finished_stage_means_complete_seeds_only():
    rows = [_stage_row(1, "baseline", 0.0, 0.87), _stage_row(1, "class_aware", 0.40, 0.86),
            _stage_row(1, "l1", 0.39, 0.85), _stage_row(1, "taylor", 0.40, 0.855),
            _stage_row(2, "baseline", 0.0, 0.88), _stage_row(2, "class_aware", 0.50, 0.87),
            _stage_row(2, "l1", 0.49, 0.84), _stage_row(2, "taylor", 0.50, 0.86),
            _stage_row(3, "baseline", 0.0, 0.5), _stage_row(3, "class_aware", 0.9, 0.1)]  # seed 3 lacks L1, Taylor
    (row,) = report.cnn_cpu_prune_rows({"reduced": False, "rows": rows})
    assert row[2] == "45.0% fewer MACs, acc 87.5% -> 86.5%"  # (0.40 + 0.50) / 2; (0.87 + 0.88) / 2 -> (0.86 + 0.87) / 2
    assert row[3] == "at the same MACs and epochs: L1-norm acc 84.5%, plain Taylor acc 85.8%"
    assert row[4] == 'protocol "cifar-cpu", 2 seeds'
    # A reduced-scale run, or one with no complete seed, gives no row (the reduced-scale rows stay).
    assert report.cnn_cpu_prune_rows({"reduced": True, "rows": rows}) == []
    assert report.cnn_cpu_prune_rows({"rows": rows[-2:]}) == [] and report.cnn_cpu_prune_rows(None) == []
    # In the README's table, the full-scale row replaces the reduced-scale pruning rows.
    reduced = {"pruning_cpu_reduced_l1_resnet20.json": {"networks": [{"arch": "resnet20", "width_divisor": 4, "rows": [
        {"model": "resnet20", "test_accuracy": 0.4, "macs_reduction": 0.0},
        {"model": "resnet20 class-aware", "test_accuracy": 0.41, "macs_reduction": 0.3},
        {"model": "resnet20 L1-norm", "test_accuracy": 0.39, "macs_reduction": 0.3}]}]}}
    readme = report.summary_table(report.LLMRows([]), reduced, {})
    assert "reduced scale" in readme and "cifar-cpu" not in readme
    readme = report.summary_table(report.LLMRows([]), reduced, {}, cnn_prune={"rows": rows})
    assert "reduced scale" not in readme and "| 45.0% fewer MACs, acc 87.5% -> 86.5% |" in readme
