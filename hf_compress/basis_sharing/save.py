"""Saving a converted SharedBasisLlama checkpoint: weights, remote code, tokenizer, perplexity and model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..checkpoint import save_pretrained_checkpoint
from ..data.text import preset_hub_source, resolve_text_source
from ..provenance import DataRef
from .evaluation import PerplexityResult
from .footprint import output_file_bytes

PERPLEXITY_FILE = "perplexity.json"


def _public_name(dataset: str) -> str:
    """A Hub or preset name as given, a local file by its name (the folder is pushed to the Hub)."""
    return DataRef.of("evaluation", dataset).name


def perplexity_json(result: PerplexityResult) -> dict[str, Any]:
    """The content of `perplexity.json`."""
    content = {"dataset": _public_name(result.dataset), "seq_len": result.seq_len, "max_windows": result.max_windows,
               "perplexity_source": result.before, "perplexity": result.after}
    if result.unhealed is not None:
        content["perplexity_before_healing"] = result.unhealed
    return content


def eval_result(result: PerplexityResult) -> dict[str, Any]:
    """The perplexity as an evaluation result of the model card (`hf_compress.cards.record_eval_results`)."""
    hub = preset_hub_source(result.dataset)
    if hub is not None:
        dataset_type, dataset_name = hub.dataset, f"{hub.dataset} {hub.config or ''} ({hub.split})".replace("  ", " ")
    else:
        hub = resolve_text_source(result.dataset)
        dataset_type, dataset_name = _public_name(result.dataset), Path(hub.dataset).name
    return {
        "task_type": "text-generation",
        "dataset_type": dataset_type,
        "dataset_name": dataset_name,
        "dataset_config": hub.config,
        "dataset_split": hub.split,
        "metric_type": "perplexity",
        "metric_name": f"perplexity ({result.seq_len}-token windows, {result.max_windows or 'all'} windows)",
        "metric_value": round(result.after, 4),
        "source": "hf-compress ppl",
        "details": {"perplexity_of_source": round(result.before, 4),
                    **({"perplexity_before_healing": round(result.unhealed, 4)} if result.unhealed is not None else {})},
    }


@torch.no_grad()
def round_weights(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Rounds every parameter to `dtype`, kept in its own dtype: the model then computes with the weights it will
    be saved with. Buffers (rotary frequencies) are left alone: a loaded checkpoint recomputes them in float32."""
    for param in model.parameters():
        param.copy_(param.to(dtype))


@torch.no_grad()
def cast_weights(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Casts every parameter (not the buffers, see `round_weights`) to `dtype`."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output: Path, *,
                    dtype: torch.dtype | None = None, overwrite: bool = False,
                    perplexity: PerplexityResult | None = None) -> None:
    """Writes the checkpoint atomically (`hf_compress.checkpoint`) with its weights in `dtype` (default: as they
    are); a measured perplexity goes in as `perplexity.json` and as an evaluation result of the card. The size of the
    saved weights is added to the record (`output_file_bytes`) before the card is written."""
    if dtype is not None:
        cast_weights(model, dtype)
    extra = {PERPLEXITY_FILE: perplexity_json(perplexity)} if perplexity is not None else {}

    def finish(folder: Path) -> None:
        _record_output_bytes(model, folder)
        _write_card(folder, perplexity)

    save_pretrained_checkpoint(model, output, processor=tokenizer, extra_files=extra, overwrite=overwrite,
                               card=finish)


def _record_output_bytes(model: PreTrainedModel, folder: Path) -> None:
    """Adds the size of the weights just written to the record, in memory and in `folder`'s config.json (the size
    is known only once the weights are on disk, after `save_pretrained` wrote the config)."""
    record = getattr(model.config, "compression", None)
    if not isinstance(record, dict):
        return
    record["output_file_bytes"] = output_file_bytes(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["compression"] = record
    # transformers' own layout of config.json
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_card(folder: Path, perplexity: PerplexityResult | None) -> None:
    from .. import cards

    if perplexity is None:
        cards.write_model_card(folder)
    else:
        cards.record_eval_results(folder, [eval_result(perplexity)])
