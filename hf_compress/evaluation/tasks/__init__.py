"""lm-evaluation-harness task configs of hf-compress (offline WikiText-2 and zero-shot sets).

The `*.yaml` files here ship as package data; `hf_compress.evaluation.lm_eval.prepare_task_dir` copies them next to the
zero-shot configs it generates (those need this machine's lm-eval and data paths). `utils` holds the functions the
configs call.
"""
