"""Where the wall-clock time of batched early exit goes: protocol "cifar-cpu", ResNet-20, stage "exits" models.

Stage "exits" (`cnn_cpu_exits.py`) measures the speedup of each threshold setting at batch 256; this script explains
it. It reloads the jointly trained exit models and the searched thresholds of each seed from the stage's work
folder, runs the test set through every configuration (every exit off, then each rule and tolerance) with forward
hooks timing each residual unit, each exit head and the final classifier, and counts the images each unit
processes. From the full network's per-unit times it predicts what skipping units should save, and splits the
measured difference into the units' time, the heads' time and the rest (the exit rule, index-selecting the samples
that go on, bookkeeping).

The configurations are run batch by batch in rotating order (as stage "exits" times them), float32, in the
memory format the stage times in (contiguous), `--rounds` passes over the test batches.

    python benchmarks/cnn_cpu_exit_profile.py --seed 2023 --seed 2024

Writes `results/cnn_cpu_exit_profile.json` and `.md` (read by `report.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, add_cifar_cpu_arguments, device_note  # noqa: E402
from cnn_cpu_exits import timed_inference  # noqa: E402

from hf_compress import __version__  # noqa: E402
from hf_compress.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402
from hf_compress.data.images import ImageClassificationData, load_image_dataset  # noqa: E402
from hf_compress.early_exit.search import disabled_threshold  # noqa: E402
from hf_compress.errors import HFCompressError  # noqa: E402
from hf_compress.modeling.class_exit_resnet import ClassExitResNetForImageClassification  # noqa: E402

STEM = "cnn_cpu_exit_profile"
RULES = ("class_exclusion", "confidence")
LABELS = {"class_exclusion": "class exclusion", "confidence": "confidence"}


def _unit_keys(record: dict[str, Any]) -> list[str]:
    """The residual units' names in a `timed_inference` record with module times (`unit<i>`, in order)."""
    return [key for key in record["seconds"] if key.startswith("unit")]


def analyse(full: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Splits the time a configuration saves against the full network (both records of `timed_inference` with
    module times).

    units_predicted: the share of the full network's time its units would save if each unit cost the same per image
    as in the full network (full per-image unit time x images that skip it). units_measured: the share the units
    actually saved. heads: the share of the full network's time the exit heads added. rest: what everything else
    added (the rule, index selection, the final classifier on fewer samples, bookkeeping). measured: 1 - wall /
    full wall (= 1 - 1 / speedup) = units_measured - heads - rest."""
    total = full["wall_s"]

    def part(record: dict[str, Any], prefix: str) -> float:
        return sum(seconds for key, seconds in record["seconds"].items() if key.startswith(prefix))

    units = _unit_keys(full)
    per_image = {key: full["seconds"][key] / full["module_images"][key] for key in units}
    skipped = {key: full["module_images"][key] - row["module_images"].get(key, 0) for key in units}
    predicted = sum(per_image[key] * skipped[key] for key in units) / total
    units_measured = (part(full, "unit") - part(row, "unit")) / total
    heads = (part(row, "head") - part(full, "head")) / total

    def other(record: dict[str, Any]) -> float:
        return record["wall_s"] - part(record, "unit") - part(record, "head")

    rest = (other(row) - other(full)) / total
    return {"macs_saved": 1 - row["mean_macs"] / full["mean_macs"], "units_predicted": predicted,
            "units_measured": units_measured, "heads": heads, "rest": rest,
            "measured": 1 - row["wall_s"] / total, "speedup": total / row["wall_s"],
            "unit_images_share": [row["module_images"].get(key, 0) / full["module_images"][key] for key in units]}


def unit_table(full: dict[str, Any], unit_macs: list[int]) -> list[dict[str, float]]:
    """Per unit of the full network: its share of the MACs and of the time, and their ratio."""
    units = _unit_keys(full)
    total_time = sum(full["seconds"][key] for key in units)
    total_macs = sum(unit_macs)
    rows = []
    for key, unit_mac in zip(units, unit_macs):
        time_share, macs_share = full["seconds"][key] / total_time, unit_mac / total_macs
        rows.append({"unit": key, "macs_share": macs_share, "time_share": time_share,
                     "time_per_mac": time_share / macs_share, "macs": unit_mac})
    return rows


def _seed_profile(args, seed: int, test: ImageClassificationData) -> dict[str, Any]:
    folder = args.work_dir / f"exits-resnet20-seed{seed}" / args.training
    result_file = folder / "result.json"
    if not result_file.is_file():
        raise HFCompressError(f"{result_file} is missing: run `bench_cnn_cpu.py exits --seed {seed}` first")
    result = json.loads(result_file.read_text())
    models = {rule: ClassExitResNetForImageClassification.from_pretrained(folder / "models" / rule).eval()
              for rule in RULES}
    exits = len(models[RULES[0]].config.exit_positions)
    configs = [(f"full:{rule}", models[rule], [disabled_threshold(rule)] * exits) for rule in RULES]
    configs += [(f"{row['rule']}@{row['tolerance']}", models[row["rule"]], row["thresholds"])
                for row in result["rows"]]
    start = time.perf_counter()
    measured = timed_inference(configs, test, batch_size=args.batch_size, rounds=args.rounds, module_times=True)
    for record in measured.values():
        del record["exit_indices"]  # a tensor; the stage's results keep the exits
    unit_macs = models[RULES[0]].unit_macs(*test.images.shape[-2:])[0]
    rows = []
    for row in result["rows"]:
        name = f"{row['rule']}@{row['tolerance']}"
        rows.append({"seed": seed, "rule": row["rule"], "tolerance": row["tolerance"],
                     "stage_speedup": row.get("speedup"), "exit_histogram": row.get("exit_histogram"),
                     **analyse(measured[f"full:{row['rule']}"], measured[name])})
    full = measured[f"full:{RULES[0]}"]
    return {"seed": seed, "rows": rows, "units": unit_table(full, unit_macs),
            "full_ms_per_batch": 1000 * full["wall_s"] / (args.rounds * len(test) / args.batch_size),
            "seconds": time.perf_counter() - start, "exit_positions": result.get("exit_positions"),
            "measured": measured}


def findings(seeds: list[dict[str, Any]]) -> list[str]:
    """What the profile shows, computed from it: the time per MAC of stage 1 against stage 3, and how the MACs
    saved turn into time saved."""
    def stage_ratio(units: range) -> float:
        return sum(s["units"][u]["time_per_mac"] for s in seeds for u in units) / (len(seeds) * len(units))

    rows = [row for s in seeds for row in s["rows"]]
    mean = lambda key, rule: sum(r[key] for r in rows if r["rule"] == rule) / len([r for r in rows if r["rule"] == rule])  # noqa: E731
    out = [f"On this CPU a stage-1 unit costs {stage_ratio(range(1, 4)):.2f}x the time its MACs predict and a "
           f"stage-3 unit {stage_ratio(range(7, 10)):.2f}x (a 3x3 convolution on the 32x32 maps with 16 channels "
           "moves 4 times as many activation bytes per MAC as one on the 8x8 maps with 64 channels). Exits skip "
           "late units, so a MAC they save is worth less time than the average MAC."]
    for rule in RULES:
        out.append(f"{LABELS[rule].capitalize()}, mean over seeds and tolerances: {_pct(mean('macs_saved', rule))} "
                   f"fewer MACs; skipping units saves {_pct(mean('units_measured', rule))} of the time "
                   f"({_pct(mean('units_predicted', rule))} predicted from the full network's unit times); the heads "
                   f"add {_pct(mean('heads', rule))} and everything else (rule, index selection) {_pct(mean('rest', rule))}; net "
                   f"{_pct(mean('measured', rule))} less time.")
    return [" ".join(out)]


def _pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%"


def markdown(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    lines = [
        "# Where batched early exit spends its time (ResNet-20, protocol \"cifar-cpu\")",
        "",
        f"Written by `benchmarks/cnn_cpu_exit_profile.py`: the jointly trained models and thresholds of stage "
        f"\"exits\", {report['test_images']} test images, batch {report['batch_size']}, {report['rounds']} passes, "
        f"float32, contiguous memory format, configurations rotating batch by batch; forward hooks time each unit "
        f"and head. Device: {report['device']}." + (f" Note: {report['note']}" if report.get("note") else ""),
        "",
        "## Time and MACs per unit of the full network",
        "",
        "| unit | " + " | ".join(f"MACs share / time share (seed {s['seed']})" for s in seeds)
        + " | time per MAC, relative |",
        "|---|" + "---|" * len(seeds) + "---|",
    ]
    for index, unit in enumerate(seeds[0]["units"]):
        cells = [f"{_pct(s['units'][index]['macs_share'])} / {_pct(s['units'][index]['time_share'])}" for s in seeds]
        ratio = sum(s["units"][index]["time_per_mac"] for s in seeds) / len(seeds)
        lines.append(f"| {unit['unit']} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    lines += [
        "",
        "Unit 0 is the stem; units 1-3, 4-6 and 7-9 are stages 1, 2 and 3 (32x32x16, 16x16x32, 8x8x64 feature "
        "maps). A relative time per MAC above 1 means the unit costs more wall-clock time than its MACs say.",
        "",
        "## What each threshold setting saves, as shares of the full network's time",
        "",
        "*MACs saved*: the stage's accounting (heads included). *units, predicted*: what skipping units saves at the "
        "full network's per-image unit times. *units, measured*: what the units saved. *heads*, *rest*: time added "
        "by the exit heads and by everything else (rule, index selection, final classifier, bookkeeping). *time saved* = units "
        "measured - heads - rest; *speedup* = 1 / (1 - time saved), next to the speedup stage \"exits\" measured.",
        "",
        "| seed | rule | tolerance | MACs saved | units, predicted | units, measured | heads | rest | time saved | "
        "speedup (here / stage) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        for row in seed["rows"]:
            stage = f"{row['stage_speedup']:.2f}x" if row.get("stage_speedup") else "-"
            lines.append(
                f"| {row['seed']} | {LABELS[row['rule']]} | {row['tolerance']} | {_pct(row['macs_saved'])} | "
                f"{_pct(row['units_predicted'])} | {_pct(row['units_measured'])} | {_pct(row['heads'])} | "
                f"{_pct(row['rest'])} | {_pct(row['measured'])} | {row['speedup']:.2f}x / {stage} |")
    lines += ["", *report.get("findings", [])]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cifar_cpu_arguments(parser, "profile", "the stage \"exits\" work folder (its models and thresholds)")
    parser.add_argument("--training", choices=["joint", "frozen"], default="joint")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over the test batches")
    args = parser.parse_args()
    args.work_dir = Path(args.work_dir)
    results = args.results_dir or RESULTS
    results.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    test = load_image_dataset("cifar10", "test", limit=args.test_limit, seed=2023)
    seeds = [_seed_profile(args, seed, test) for seed in (args.seed or [2023, 2024])]
    report = {"stage": "exit_profile", "device": device_note(), "note": args.note,
              "batch_size": args.batch_size, "rounds": args.rounds, "test_images": len(test),
              "training": args.training, "hf_compress_version": __version__, "seeds": seeds,
              "findings": findings(seeds)}
    atomic_write_json(results / f"{STEM}.json", report)
    atomic_write_text(results / f"{STEM}.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
