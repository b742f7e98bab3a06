"""`hf-compress push`, `hf-compress eval` and `hf-compress card`."""

from __future__ import annotations

from typing import Optional

import typer


def push_command(
    model_dir: str = typer.Argument(..., help="A finished checkpoint folder (config.json, weights, ...)."),
    repo_id: str = typer.Argument(..., help="ORG/NAME on the Hub; created if missing."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (ignored if it exists)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to; created if missing."),
    commit_message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
) -> None:
    """Upload a checkpoint folder to the Hub in one commit (HF_ENDPOINT and HF_TOKEN are honoured)."""
    from ..hub import push_to_hub

    url = push_to_hub(model_dir, repo_id, private=private, revision=revision, commit_message=commit_message)
    typer.echo(f"pushed {model_dir} to {repo_id}: {url}")


def eval_command(
    model: str = typer.Argument(..., help="Model folder or Hub id (a GGUF folder with --gguf-file)."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval tasks: hfc_wikitext2, hfc_zeroshot, "
                              "hfc_piqa, hfc_arc_easy, ... (local data) or any lm-eval task name (Hub data)."),
    limit: Optional[float] = typer.Option(None, "--limit", help="Items per task (an integer) or a fraction (< 1)."),
    batch_size: str = typer.Option("1", "--batch-size", help="An integer or 'auto'."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:0, ... (default: cuda if present)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot"),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="GGUF file inside MODEL."),
    output: Optional[str] = typer.Option(None, "--output", help="Results JSON (default MODEL/lm_eval_results.json)."),
    update_card: bool = typer.Option(False, "--update-card", help="Record the metrics in MODEL's model card."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the code a model ships (its auto_map) to load it; read it first. "
        "hf-compress checkpoints never need it."),
) -> None:
    """Evaluate with lm-evaluation-harness (`hf` model) and write the results beside the model."""
    from ..errors import HFCompressError
    from ..evaluation.lm_eval import evaluate

    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise HFCompressError(f"--limit {limit}: give a whole number of items or a fraction below 1")
        limit = int(limit)
    results, path = evaluate(
        model, [t.strip() for t in tasks.split(",") if t.strip()], output=output, update_card=update_card,
        limit=limit, batch_size=int(batch_size) if batch_size.isdigit() else batch_size, device=device, dtype=dtype,
        num_fewshot=num_fewshot, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
    )
    for task, metrics in results["results"].items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "_stderr" not in k)
        typer.echo(f"{task}: {shown}")
    typer.echo(f"wall time {results['hf_compress']['wall_time_s']:.1f} s; results in {path}"
               + ("; model card updated" if update_card else ""))


def card_command(
    model_dir: str = typer.Argument(..., help="A checkpoint folder."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Hub id of the source model."),
    license: Optional[str] = typer.Option(None, "--license", help="License id (default: the source's, if known)."),
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="ORG/NAME the usage snippets load."),
) -> None:
    """(Re)write MODEL_DIR/README.md from its config.json and eval_results.json."""
    from ..cards import write_model_card

    typer.echo(f"wrote {write_model_card(model_dir, base_model=base_model, license=license, repo_id=repo_id)}")


def register(app: typer.Typer) -> None:
    """Adds this group's commands to `app`."""
    app.command("push")(push_command)
    app.command("eval")(eval_command)
    app.command("card")(card_command)
