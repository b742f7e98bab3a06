"""Perplexity of the source and of the compressed model on one text, measured during a conversion, and `ppl`."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.text import load_text_option
from ..device import named_dtype, pick_device
from ..errors import HFCompressError
from .config import EVAL_SEQ_LEN


@dataclass
class PerplexityResult:
    """Perplexity before and after compression on `dataset` (as the user named it), in `seq_len`-token windows;
    `unhealed`: of the compressed model before healing, when it was healed."""

    dataset: str
    seq_len: int
    max_windows: int | None
    before: float
    after: float
    unhealed: float | None = None


def check_window_options(seq_len: int, max_windows: int | None, *, seq_flag: str = "--seq-len",
                         windows_flag: str = "--max-windows") -> None:
    """Refuses windows that measure nothing: under 2 tokens (no next token to predict) or `max_windows` below 1
    (omitted, every window of the text counts)."""
    if seq_len < 2:
        raise HFCompressError(f"{seq_flag} must be >= 2 (a window predicts its tokens after the first); got {seq_len}.")
    if max_windows is not None and max_windows < 1:
        raise HFCompressError(f"{windows_flag} must be >= 1 (omit it to use every window); got {max_windows}.")


def check_context(flag: str, seq_len: int, limit: int | None, model: str) -> None:
    """Refuses sequences longer than the model's context `limit` (`max_position_embeddings` of its config, read
    before its weights load): beyond it the positions have no trained meaning. `None`: the config does not say."""
    if isinstance(limit, int) and seq_len > limit:
        raise HFCompressError(f"{flag} {seq_len} is longer than the context of {model} "
                              f"(max_position_embeddings {limit}); use at most {limit}.")


def measure_perplexity(source: PreTrainedModel | None, compressed: PreTrainedModel,
                       tokenizer: PreTrainedTokenizerBase, dataset: str, texts: list[str], *,
                       seq_len: int = EVAL_SEQ_LEN, max_windows: int | None = None, progress: bool = True,
                       before: float | None = None) -> PerplexityResult:
    """Perplexity of both models on the same windows of `texts`, the rows of `dataset` (as the user named it).

    `before`: the source's perplexity, measured earlier on the same windows (`convert` measures it before the
    source's layers are released); `source` is then not run and may be `None`.
    """
    from ..evaluation.perplexity import perplexity

    def measure(model: PreTrainedModel) -> float:
        return perplexity(model, tokenizer, texts, seq_len=seq_len, max_windows=max_windows, progress=progress)

    if before is None:
        if source is None:
            raise ValueError("measure_perplexity needs the source model or its perplexity `before`.")
        before = measure(source)
    return PerplexityResult(dataset, seq_len, max_windows, before, measure(compressed))


def model_perplexity(model: str, dataset: str, *, config: str | None = None, split: str | None = None,
                     column: str | None = None, seq_len: int = EVAL_SEQ_LEN, max_windows: int | None = None,
                     gguf_file: str | None = None, device: str | None = None, dtype: str = "float32",
                     trust_remote_code: bool = False) -> float:
    """Perplexity of any causal LM (folder, Hub id, `.gguf` file or `"smollm2"`) on a text, as `hf-compress ppl`
    measures it. The options, the model's context and the text are checked before the weights load.

    Code shipped with the model runs only with `trust_remote_code` (see `sources.needs_remote_code`).
    """
    import torch

    from ..evaluation.perplexity import perplexity
    from ..sources import check_loadable, load_causal_lm, read_config_dict, resolve_source

    check_window_options(seq_len, max_windows)
    torch_dtype = getattr(torch, named_dtype(dtype, "--dtype"))
    target = pick_device(device)
    name_or_path, gguf_name = resolve_source(model, gguf_file)
    gguf_kwargs = {"gguf_file": gguf_name} if gguf_name else {}
    # The options first (they need only the config), then the text, then the folder's shipped code and weight
    # files: all of it before the weights load.
    context = read_config_dict(model, name_or_path, **gguf_kwargs).get("max_position_embeddings")
    check_context("--seq-len", seq_len, context, model)
    texts = load_text_option("--dataset", dataset, config, split, column)
    if not gguf_name:
        check_loadable(model, name_or_path, gguf_kwargs, trust_remote_code)
    lm, tokenizer = load_causal_lm(model, gguf_file=gguf_file, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    lm.to(target)
    return perplexity(lm, tokenizer, texts, seq_len=seq_len, max_windows=max_windows)
