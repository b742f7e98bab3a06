"""Registration of every hf-compress model family with the transformers Auto classes.

Importing `hf_compress` calls `register_families()`, so an installed plugin loads compressed
checkpoints with the stock `AutoModel...from_pretrained` and no `trust_remote_code`.
"""

from __future__ import annotations

import importlib

import transformers

# family package (under hf_compress.modeling) -> (config class, {Auto class name: model class})
FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    "pruned_cnn": (
        "PrunedCNNConfig",
        {"AutoModel": "PrunedCNNModel", "AutoModelForImageClassification": "PrunedCNNForImageClassification"},
    ),
    "class_exit_resnet": (
        "ClassExitResNetConfig",
        {"AutoModelForImageClassification": "ClassExitResNetForImageClassification"},
    ),
    "shared_basis_llama": (
        "SharedBasisLlamaConfig",
        {"AutoModel": "SharedBasisLlamaModel", "AutoModelForCausalLM": "SharedBasisLlamaForCausalLM"},
    ),
}


def register_families() -> None:
    """Registers each family's config and models with `AutoConfig` and the matching Auto model classes."""
    for package, (config_name, auto_classes) in FAMILIES.items():
        module = importlib.import_module(f"hf_compress.modeling.{package}")
        config_class = getattr(module, config_name)
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, model_name in auto_classes.items():
            getattr(transformers, auto_name).register(config_class, getattr(module, model_name), exist_ok=True)
