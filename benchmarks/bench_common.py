"""What the CNN benchmark scripts share: their data arguments, the protocol's splits, the device note, result files."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from hf_compress.checkpoint import atomic_write_json, atomic_write_text
from hf_compress.data.images import ImageClassificationData, load_splits

RESULTS = Path(__file__).resolve().parent / "results"


def add_data_arguments(parser: argparse.ArgumentParser, *, val_flag: str = "--val-size") -> None:
    """--dataset, --train-limit, --test-limit, the validation hold-out (`args.val_size`), and the baseline's
    --lr, --batch-size and --seed."""
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate of baseline training")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument(val_flag, dest="val_size", type=int, default=5000, help="train images held out (seed 2023)")


def add_cifar_cpu_arguments(parser: argparse.ArgumentParser, group_title: str, work_dir_help: str):
    """The options every stage of protocol "cifar-cpu" has (seeds, work dir, note, folders, reduced-scale limits),
    each added only once: a stage's own script and bench_cnn_cpu.py (which holds every stage's options) both call
    this. Returns the stage's argument group, for its own options."""

    def add(target, *flags: str, **kwargs) -> None:
        if not any(flag in parser._option_string_actions for flag in flags):
            target.add_argument(*flags, **kwargs)

    add(parser, "--seed", type=int, action="append", help="repeatable (default 2023 and 2024)")
    # In the repository: a stage longer than one sitting continues on another machine from a clone.
    add(parser, "--work-dir", default=str(Path(__file__).resolve().parent / "work" / "cnn_cpu"), help=work_dir_help)
    add(parser, "--note", default="", help="recorded with each row (e.g. other jobs on the machine)")
    group = parser.add_argument_group(group_title)
    add(group, "--baseline-dir", type=Path, default=None,
        help="folder holding resnet20-seed<seed> (default results/cnn_cpu)")
    add(group, "--results-dir", type=Path, default=None, help="where results go (default benchmarks/results)")
    add(group, "--train-limit", type=int, default=None, help="reduced scale only: train images used")
    add(group, "--val-size", type=int, default=None, help="reduced scale only (protocol: 5000)")
    add(group, "--test-limit", type=int, default=None, help="reduced scale only: test images used")
    return group


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def seed_summary(rows: list[dict], prefix: str, figures: tuple[str, ...]) -> dict:
    """`<prefix>_<figure>` (mean over `rows`, one per seed) and `<prefix>_<figure>_per_seed`, as the cifar-cpu
    summary file stores every figure."""
    mine = sorted(rows, key=lambda r: r["seed"])
    entries: dict = {}
    for figure in figures:
        entries[f"{prefix}_{figure}"] = mean([r[figure] for r in mine])
        entries[f"{prefix}_{figure}_per_seed"] = {str(r["seed"]): r[figure] for r in mine}
    return entries


def load_data(args) -> tuple[ImageClassificationData, ImageClassificationData, ImageClassificationData]:
    """`(train, validation, test)` as the protocol fixes them (validation held out of train with seed 2023)."""
    return load_splits(args.dataset, val_size=args.val_size, eval_split="test", seed=args.seed,
                       limit=args.train_limit, eval_limit=args.test_limit)


def device_note(threads: int | None = None) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {threads or torch.get_num_threads()} threads)"


def write_results(stem: str, report: dict, markdown: str) -> None:
    """`results/<stem>.json` and `results/<stem>.md`, each replaced whole."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{stem}.json", report)
    atomic_write_text(RESULTS / f"{stem}.md", markdown if markdown.endswith("\n") else markdown + "\n")
