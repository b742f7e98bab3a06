"""Evaluation with lm-evaluation-harness, offline-capable.

`run_lm_eval` calls `lm_eval.simple_evaluate` with the `hf` model (`trust_remote_code=True`, so a compressed
checkpoint loads through its shipped modeling code) and a task folder from `prepare_task_dir`:

- `hfc_wikitext2`: WikiText-2 raw test perplexity over the local file (`lm_eval_tasks/hfc_wikitext2.yaml`);
- `hfc_piqa`, `hfc_arc_easy`, `hfc_arc_challenge`, `hfc_winogrande`, `hfc_openbookqa`, `hfc_mathqa` and the group
  `hfc_zeroshot` of all six: each `include:`s lm-eval's own task YAML and only points its dataset at a local parquet
  file, so prompts and metrics are lm-eval's. They are generated at run time because both paths (lm-eval's install,
  the data folder) are only known then.

Any other task name is passed to lm-eval unchanged (it needs Hub access for its data).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import HFCompressError

LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
RESULTS_FILE = "lm_eval_results.json"


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
LOCAL_TASKS = (WIKITEXT_TASK, *ZEROSHOT_SETS, ZEROSHOT_GROUP)


def data_dir() -> Path:
    from .tasks.utils import data_dir as _data_dir

    return _data_dir()


def prepare_task_dir(dest: str | os.PathLike | None = None) -> Path:
    """Writes the hf-compress lm-eval task configs into `dest` (default: a new temp folder) and returns it.

    Pass it to lm-eval as `--include_path` (or `TaskManager(include_path=...)`).
    """
    import lm_eval.tasks
    import yaml

    out = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="hfc_lm_eval_tasks_"))
    out.mkdir(parents=True, exist_ok=True)
    for item in resources.files("hf_compress.evaluation.tasks").iterdir():
        if item.name.endswith(".yaml"):
            (out / item.name).write_text(item.read_text(encoding="utf-8"), encoding="utf-8")
    builtin = Path(lm_eval.tasks.__file__).parent
    data = data_dir().resolve()
    for name, local in ZEROSHOT_SETS.items():
        config = {
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
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    group = {
        "group": ZEROSHOT_GROUP,
        "task": list(ZEROSHOT_SETS),
        # The papers report the plain mean over tasks, not one weighted by task size.
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
        "metadata": {"version": 1.0},
    }
    (out / f"{ZEROSHOT_GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False), encoding="utf-8")
    return out


def _check_local_data(tasks: list[str]) -> None:
    needed = [ZEROSHOT_SETS[t].data_file for t in tasks if t in ZEROSHOT_SETS]
    if ZEROSHOT_GROUP in tasks:
        needed += [s.data_file for s in ZEROSHOT_SETS.values()]
    if WIKITEXT_TASK in tasks:
        from .tasks.utils import WIKITEXT2_TEST

        needed.append(WIKITEXT2_TEST)
    missing = [f for f in needed if not (data_dir() / f).is_file()]
    if missing:
        raise HFCompressError(f"local task data missing under {data_dir()}: {', '.join(missing)}; "
                              "set HF_COMPRESS_DATA to the data folder")


def run_lm_eval(
    model: str | os.PathLike,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str = "cpu",
    dtype: str = "float32",
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
) -> dict:
    """Runs lm-eval's `simple_evaluate` on `model` (a folder, a Hub id, or a GGUF folder with `gguf_file`).

    Returns lm-eval's results dict (without per-sample logs) plus `hf_compress`: wall time and the arguments.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise HFCompressError(f"lm-evaluation-harness is not installed ({err}): pip install 'hf-compress[eval]'") from None

    if not tasks:
        raise HFCompressError("no task given: pass --tasks, e.g. hfc_wikitext2 or hfc_zeroshot")
    if Path(str(model)).exists() and not gguf_file and not (Path(model) / "config.json").is_file():
        raise HFCompressError(f"{model} is not a model folder: it has no config.json")
    _check_local_data(tasks)
    model_args: dict = {"pretrained": str(model), "trust_remote_code": True, "dtype": dtype}
    if gguf_file:
        model_args["gguf_file"] = gguf_file
    if tokenizer:
        model_args["tokenizer"] = tokenizer
    if max_length:
        model_args["max_length"] = max_length
    with tempfile.TemporaryDirectory(prefix="hfc_lm_eval_tasks_") as include:
        # Indexing lm-eval's thousands of built-in tasks takes seconds; only do it when a task needs it.
        task_manager = TaskManager(include_path=str(prepare_task_dir(include)),
                                   include_defaults=any(t not in LOCAL_TASKS for t in tasks))
        unknown = [t for t in tasks if not task_manager.match_tasks([t])]
        if unknown:
            raise HFCompressError(f"unknown lm-eval task(s) {unknown}; local tasks: {', '.join(LOCAL_TASKS)}")
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
            batch_size=batch_size, device=device, task_manager=task_manager, log_samples=False,
        )
        wall = time.perf_counter() - start
    if results is None:  # lm-eval returns None on non-zero ranks only
        raise HFCompressError("lm-eval returned no results")
    results.pop("samples", None)
    results["hf_compress"] = {
        "wall_time_s": wall, "model": str(model), "gguf_file": gguf_file, "tasks": list(tasks), "limit": limit,
        "batch_size": batch_size, "device": device, "dtype": dtype,
    }
    return results


def save_results(results: dict, path: str | os.PathLike) -> Path:
    """Writes lm-eval results as JSON (non-serializable values as strings), atomically."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    os.replace(tmp, path)
    return path


def card_entries(results: dict) -> list[dict]:
    """The model-card evaluation results (see `hf_compress.cards.record_eval_results`) of an lm-eval run."""
    import lm_eval

    limit = (results.get("hf_compress") or {}).get("limit") or results.get("config", {}).get("limit")
    n_shot = results.get("n-shot", {})
    source = f"lm-eval {getattr(lm_eval, '__version__', '')}".strip()
    entries = []
    for task, metrics in results.get("results", {}).items():
        local = ZEROSHOT_SETS.get(task)
        shots = n_shot.get(task, 0)
        suffix = f"lm-eval, {shots}-shot" + (f", limit {limit}" if limit else "")
        details = {"limit": limit, "num_fewshot": shots, "n_samples": results.get("n-samples", {}).get(task)}
        if task in (WIKITEXT_TASK, "wikitext"):
            dataset = {"dataset_type": "wikitext", "dataset_name": "WikiText-2 (raw, test)",
                       "dataset_config": "wikitext-2-raw-v1", "dataset_split": "test"}
            wanted = ("word_perplexity", "byte_perplexity", "bits_per_byte")
        elif task == ZEROSHOT_GROUP:
            dataset = {"dataset_type": "hf-compress/zeroshot", "dataset_name": "mean of 6 zero-shot tasks"}
            wanted = ("acc",)
        elif local is not None:
            dataset = {"dataset_type": local.hub_id, "dataset_name": local.title, "dataset_config": local.hub_config,
                       "dataset_split": local.split}
            wanted = ("acc", "acc_norm")
        else:  # a stock lm-eval task: report what it measured
            dataset = {"dataset_type": task, "dataset_name": task}
            wanted = tuple(k.split(",")[0] for k in metrics if "," in k and "_stderr" not in k)
        for key, value in metrics.items():
            name, _, flt = key.partition(",")
            if name not in wanted or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            stderr = metrics.get(f"{name}_stderr,{flt}")
            entries.append({
                "task_type": "text-generation", "task_name": task, **{k: v for k, v in dataset.items() if v},
                "metric_type": name, "metric_name": f"{name} ({suffix})", "metric_value": float(value),
                "source": source, "source_url": LM_EVAL_URL,
                "details": {**details, **({"stderr": stderr} if isinstance(stderr, (int, float)) else {})},
            })
    return entries


def evaluate(
    model: str | os.PathLike,
    tasks: list[str],
    *,
    output: str | os.PathLike | None = None,
    update_card: bool = False,
    **kwargs,
) -> tuple[dict, Path]:
    """Runs `run_lm_eval`, writes the results JSON (default: `MODEL/lm_eval_results.json`) and, with
    `update_card`, records the metrics in the model folder's `eval_results.json` and model card."""
    folder = Path(model)
    is_local_dir = folder.is_dir()
    if update_card and not (is_local_dir and (folder / "config.json").is_file()):
        raise HFCompressError(f"--update-card needs a local checkpoint folder, got {model}")
    if output is None:
        if kwargs.get("gguf_file"):
            # A GGUF file often lives in an installed package; never write results there implicitly.
            raise HFCompressError("evaluating a GGUF file: pass --output for the results JSON")
        if not is_local_dir:
            raise HFCompressError(f"{model} is not a local folder: pass --output for the results JSON")
        output = folder / RESULTS_FILE
    results = run_lm_eval(model, tasks, **kwargs)
    path = save_results(results, output)
    if update_card:
        from ..cards import record_eval_results

        record_eval_results(folder, card_entries(results))
    return results, path
