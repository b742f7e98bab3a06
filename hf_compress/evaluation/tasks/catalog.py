"""The hf-compress lm-eval tasks, their local data, and the task folder lm-eval reads them from.

- `hfc_wikitext2`: WikiText-2 raw test perplexity over the local file (`hfc_wikitext2.yaml` beside this module);
- `hfc_piqa`, `hfc_arc_easy`, `hfc_arc_challenge`, `hfc_winogrande`, `hfc_openbookqa`, `hfc_mathqa` and the group
  `hfc_zeroshot` of all six: each `include:`s lm-eval's own task YAML and only points its dataset at a local parquet
  file, so prompts and metrics are lm-eval's. They are generated at run time because both paths (lm-eval's install,
  the data folder) are only known then.

This is the lower layer of `hf_compress.evaluation`: it never imports `hf_compress.evaluation.lm_eval`, and imports
lm-eval itself only inside `prepare_task_dir`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ...data.local import data_root
from ...errors import HFCompressError


@dataclass(frozen=True)
class LocalSet:
    """A local stand-in for the dataset of one built-in lm-eval task."""

    builtin_yaml: str  # relative to lm_eval/tasks
    data_file: str  # relative to the data folder
    split: str  # the split the task evaluates on ("validation" or "test")
    hub_id: str  # the Hub dataset this file stands in for (model-index `dataset.type`)
    hub_config: str | None
    title: str


ZEROSHOT_SETS: dict[str, LocalSet] = {
    "hfc_piqa": LocalSet("piqa/piqa.yaml", "zeroshot/piqa/validation-00000-of-00001.parquet", "validation",
                         "baber/piqa", None, "PIQA"),
    "hfc_arc_easy": LocalSet("arc/arc_easy.yaml", "zeroshot/arc_easy/test-00000-of-00001.parquet", "test",
                             "allenai/ai2_arc", "ARC-Easy", "ARC-Easy"),
    "hfc_arc_challenge": LocalSet("arc/arc_challenge.yaml", "zeroshot/arc_challenge/test-00000-of-00001.parquet",
                                  "test", "allenai/ai2_arc", "ARC-Challenge", "ARC-Challenge"),
    "hfc_winogrande": LocalSet("winogrande/default.yaml", "zeroshot/winogrande/validation-00000-of-00001.parquet",
                               "validation", "allenai/winogrande", "winogrande_xl", "WinoGrande"),
    "hfc_openbookqa": LocalSet("openbookqa/openbookqa.yaml", "zeroshot/openbookqa/test-00000-of-00001.parquet",
                               "test", "allenai/openbookqa", "main", "OpenBookQA"),
    "hfc_mathqa": LocalSet("mathqa/mathqa.yaml", "zeroshot/mathqa/test-00000-of-00001.parquet", "test",
                           "allenai/math_qa", None, "MathQA"),
}
ZEROSHOT_GROUP = "hfc_zeroshot"
WIKITEXT_TASK = "hfc_wikitext2"
WIKITEXT2_TEST = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
LOCAL_TASKS = (WIKITEXT_TASK, *ZEROSHOT_SETS, ZEROSHOT_GROUP)


def data_dir() -> Path:
    """The local data folder (see `hf_compress.data.local.data_root`)."""
    return data_root()


def check_local_data(tasks: list[str]) -> None:
    """Raises `HFCompressError` naming the local data files that `tasks` need and the data folder lacks."""
    needed = [ZEROSHOT_SETS[t].data_file for t in tasks if t in ZEROSHOT_SETS]
    if ZEROSHOT_GROUP in tasks:
        needed += [s.data_file for s in ZEROSHOT_SETS.values()]
    if WIKITEXT_TASK in tasks:
        needed.append(WIKITEXT2_TEST)
    missing = [f for f in needed if not (data_dir() / f).is_file()]
    if missing:
        raise HFCompressError(f"local task data missing under {data_dir()}: {', '.join(missing)}; "
                              "set HF_COMPRESS_DATA to the data folder")


def prepare_task_dir(dest: str | os.PathLike | None = None) -> Path:
    """Writes the hf-compress lm-eval task configs into `dest` (default: a new temp folder) and returns it.

    Pass it to lm-eval as `--include_path` (or `TaskManager(include_path=...)`).
    """
    import lm_eval.tasks
    import yaml

    out = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="hfc_lm_eval_tasks_"))
    out.mkdir(parents=True, exist_ok=True)
    for item in resources.files(__package__).iterdir():
        if item.name.endswith(".yaml"):
            (out / item.name).write_text(item.read_text(encoding="utf-8"), encoding="utf-8")
    builtin = Path(lm_eval.tasks.__file__).parent
    data = data_dir().resolve()
    configs = {name: _zeroshot_config(name, local, builtin, data) for name, local in ZEROSHOT_SETS.items()}
    configs[ZEROSHOT_GROUP] = _zeroshot_group()
    for name, config in configs.items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


def _zeroshot_config(name: str, local: LocalSet, builtin: Path, data: Path) -> dict:
    """A task that includes lm-eval's own YAML and only points its dataset at the local parquet file."""
    return {
        "include": str(builtin / local.builtin_yaml),
        "task": name,
        "tag": [],  # keep out of the built-in groups (ai2_arc, ...), which would pull Hub data
        "dataset_path": "parquet",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {local.split: str(data / local.data_file)}},
        "training_split": None,
        "validation_split": local.split if local.split == "validation" else None,
        "test_split": local.split if local.split == "test" else None,
    }


def _zeroshot_group() -> dict:
    return {
        "group": ZEROSHOT_GROUP,
        "task": list(ZEROSHOT_SETS),
        # The papers report the plain mean over tasks, not one weighted by task size.
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
        "metadata": {"version": 1.0},
    }
