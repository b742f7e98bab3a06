"""Evaluation with lm-evaluation-harness, offline-capable.

`run_lm_eval` calls `lm_eval.simple_evaluate` with the `hf` model (hf-compress checkpoints load through the
installed plugin; code shipped with any other model runs only with `trust_remote_code=True`) and the task folder of
`hf_compress.evaluation.tasks` (`hfc_wikitext2`, the six `hfc_*` zero-shot sets and their group `hfc_zeroshot`, all
over local data files). Any other task name is passed to lm-eval unchanged (it needs Hub access for its data).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..device import pick_device
from ..errors import HFCompressError
from .tasks import (
    LOCAL_TASKS,
    WIKITEXT_TASK,
    ZEROSHOT_GROUP,
    ZEROSHOT_SETS,
    check_local_data,
    prepare_task_dir,
)

LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
RESULTS_FILE = "lm_eval_results.json"


def _check_request(model: str | os.PathLike, tasks: list[str], gguf_file: str | None, trust_remote_code: bool) -> None:
    """Refuses an empty task list, a folder that is no loadable checkpoint, a model that would run its shipped code
    unasked and missing local data, before any loading."""
    from ..sources import check_loadable

    if not tasks:
        raise HFCompressError("no task given: pass --tasks, e.g. hfc_wikitext2 or hfc_zeroshot")
    check_loadable(str(model), str(model), {"gguf_file": gguf_file} if gguf_file else {}, trust_remote_code)
    check_local_data(tasks)


def _task_manager(include: str, tasks: list[str]):
    """lm-eval's `TaskManager` over the hf-compress tasks; unknown task names are refused here."""
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's thousands of built-in tasks takes seconds; only do it when a task needs it.
    task_manager = TaskManager(include_path=str(prepare_task_dir(include)),
                               include_defaults=any(t not in LOCAL_TASKS for t in tasks))
    unknown = [t for t in tasks if not task_manager.match_tasks([t])]
    if unknown:
        raise HFCompressError(f"unknown lm-eval task(s) {unknown}; local tasks: {', '.join(LOCAL_TASKS)}")
    return task_manager


def run_lm_eval(
    model: str | os.PathLike,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    dtype: str = "float32",
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Runs lm-eval's `simple_evaluate` on `model` (a folder, a Hub id, or a GGUF folder with `gguf_file`).

    Code shipped with the model (an `auto_map` in its config.json) runs only with `trust_remote_code`; hf-compress's
    own families need no such code. `device` None is `hf_compress.device.pick_device(None)` (cuda when present, else
    cpu), as for every command.
    Returns lm-eval's results dict (without per-sample logs) plus `hf_compress`: wall time and the arguments.
    """
    try:
        import lm_eval
    except ImportError as err:
        raise HFCompressError(f"lm-evaluation-harness is not installed ({err}): pip install 'hf-compress[eval]'") from None

    _check_request(model, tasks, gguf_file, trust_remote_code)
    device = str(pick_device(device))
    model_args = {"pretrained": str(model), "trust_remote_code": trust_remote_code, "dtype": dtype}
    # Only the optional arguments given: lm-eval's own defaults stand for the others.
    optional = {"gguf_file": gguf_file, "tokenizer": tokenizer, "max_length": max_length}
    model_args.update({key: value for key, value in optional.items() if value})
    with tempfile.TemporaryDirectory(prefix="hfc_lm_eval_tasks_") as include:
        task_manager = _task_manager(include, tasks)
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
    atomic_write_text(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    return path


def _dataset_and_metrics(task: str, metrics: dict) -> tuple[dict, tuple[str, ...]]:
    """The model-index dataset fields of `task` and the metrics of it that go into the card."""
    local = ZEROSHOT_SETS.get(task)
    if task in (WIKITEXT_TASK, "wikitext"):
        return ({"dataset_type": "wikitext", "dataset_name": "WikiText-2 (raw, test)",
                 "dataset_config": "wikitext-2-raw-v1", "dataset_split": "test"},
                ("word_perplexity", "byte_perplexity", "bits_per_byte"))
    if task == ZEROSHOT_GROUP:
        return {"dataset_type": "hf-compress/zeroshot", "dataset_name": "mean of 6 zero-shot tasks"}, ("acc",)
    if local is not None:
        return ({"dataset_type": local.hub_id, "dataset_name": local.title, "dataset_config": local.hub_config,
                 "dataset_split": local.split}, ("acc", "acc_norm"))
    # A stock lm-eval task: report what it measured.
    return ({"dataset_type": task, "dataset_name": task},
            tuple(k.split(",")[0] for k in metrics if "," in k and "_stderr" not in k))


def card_entries(results: dict) -> list[dict]:
    """The model-card evaluation results (see `hf_compress.cards.record_eval_results`) of an lm-eval run."""
    import lm_eval

    limit = (results.get("hf_compress") or {}).get("limit") or results.get("config", {}).get("limit")
    source = f"lm-eval {getattr(lm_eval, '__version__', '')}".strip()
    entries = []
    for task, metrics in results.get("results", {}).items():
        dataset, wanted = _dataset_and_metrics(task, metrics)
        shots = results.get("n-shot", {}).get(task, 0)
        suffix = f"lm-eval, {shots}-shot" + (f", limit {limit}" if limit else "")
        details = {"limit": limit, "num_fewshot": shots, "n_samples": results.get("n-samples", {}).get(task)}
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
