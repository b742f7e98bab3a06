"""`python -m hf_compress.evaluation.tasks [DIR]`: writes the hf-compress lm-eval tasks to DIR (default
`$XDG_CACHE_HOME/hf_compress/lm_eval_tasks`, i.e. ~/.cache/...) and prints it, for the stock command
`lm_eval ... --include_path "$(python -m hf_compress.evaluation.tasks)"`."""

import os
import sys
from pathlib import Path

from hf_compress.evaluation.tasks.catalog import prepare_task_dir

cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_compress" / "lm_eval_tasks"
print(prepare_task_dir(sys.argv[1] if len(sys.argv) > 1 else cache))
