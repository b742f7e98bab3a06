"""`python -m hf_compress.lm_eval_tasks [DIR]`: writes the hf-compress lm-eval tasks to DIR (default: a temp
folder) and prints it, for the stock `lm_eval ... --include_path "$(python -m hf_compress.lm_eval_tasks)"`."""

import sys

from hf_compress.evaluation import prepare_task_dir

print(prepare_task_dir(sys.argv[1] if len(sys.argv) > 1 else None))
