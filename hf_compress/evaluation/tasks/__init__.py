"""lm-evaluation-harness task configs of hf-compress (offline WikiText-2 and zero-shot sets).

The `*.yaml` files here ship as package data; `prepare_task_dir` (in `catalog`, with the task and data tables)
copies them next to the zero-shot configs it generates (those need this machine's lm-eval and data paths). `utils`
holds the functions the configs call. This package is the lower layer: `hf_compress.evaluation.lm_eval` imports from
it, never the other way round.
"""

from .catalog import (
    LOCAL_TASKS,
    WIKITEXT2_TEST,
    WIKITEXT_TASK,
    ZEROSHOT_GROUP,
    ZEROSHOT_SETS,
    LocalSet,
    check_local_data,
    data_dir,
    prepare_task_dir,
)

__all__ = [
    "LOCAL_TASKS",
    "WIKITEXT2_TEST",
    "WIKITEXT_TASK",
    "ZEROSHOT_GROUP",
    "ZEROSHOT_SETS",
    "LocalSet",
    "check_local_data",
    "data_dir",
    "prepare_task_dir",
]
