"""Perplexity of the source and of the compressed model on one text, measured during a conversion."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.text import load_texts, resolve_text_source
from .config import EVAL_SEQ_LEN


@dataclass
class PerplexityResult:
    """Perplexity before and after compression on `dataset` (as the user named it), in `seq_len`-token windows."""

    dataset: str
    seq_len: int
    max_windows: int | None
    before: float
    after: float


def measure_perplexity(source: PreTrainedModel, compressed: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       dataset: str, *, seq_len: int = EVAL_SEQ_LEN, max_windows: int | None = None,
                       progress: bool = True) -> PerplexityResult:
    """Perplexity of both models on the same windows of `dataset` (preset, local file or Hub name)."""
    from ..evaluation.perplexity import perplexity

    texts = load_texts(resolve_text_source(dataset))
    before, after = (perplexity(model, tokenizer, texts, seq_len=seq_len, max_windows=max_windows, progress=progress)
                     for model in (source, compressed))
    return PerplexityResult(dataset, seq_len, max_windows, before, after)


def model_perplexity(model: str, dataset: str, *, config: str | None = None, split: str | None = None,
                     column: str | None = None, seq_len: int = EVAL_SEQ_LEN, max_windows: int | None = None,
                     gguf_file: str | None = None, device: str | None = None, dtype: str = "float32") -> float:
    """Perplexity of any causal LM (folder, Hub id, `.gguf` file or `"smollm2"`) on a text, as `hf-compress ppl`
    measures it."""
    import torch

    from ..device import pick_device
    from ..evaluation.perplexity import perplexity
    from ..sources import load_causal_lm

    lm, tokenizer = load_causal_lm(model, gguf_file=gguf_file, dtype=getattr(torch, dtype))
    lm.to(pick_device(device))
    return perplexity(lm, tokenizer, load_texts(resolve_text_source(dataset, config, split, column)),
                      seq_len=seq_len, max_windows=max_windows)
