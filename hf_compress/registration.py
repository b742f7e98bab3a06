"""Registration of every hf-compress model family with the transformers Auto classes.

Importing `hf_compress` registers the families (`register_on_import`), so an installed plugin loads compressed
checkpoints with the stock `AutoModel...from_pretrained` and no `trust_remote_code`. transformers and torch take
seconds to import, so when transformers is not imported yet the registration waits for it: it runs as soon as
`import transformers` has executed, before any of its classes can be used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from types import ModuleType

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
    import transformers

    for package, (config_name, auto_classes) in FAMILIES.items():
        module = importlib.import_module(f"hf_compress.modeling.{package}")
        config_class = getattr(module, config_name)
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, model_name in auto_classes.items():
            getattr(transformers, auto_name).register(config_class, getattr(module, model_name), exist_ok=True)


# The family packages, whose own first import may be what imports transformers.
_FAMILY_PACKAGES = frozenset(f"hf_compress.modeling.{package}" for package in FAMILIES)
_hook_state = {"families_loading": 0, "registering": False}


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """A post-import hook: finds `transformers` and the family packages as the other finders do, and has their
    loaders call `_register_when_ready` once the module has executed.

    The family packages are watched too because importing one of them first (`from hf_compress.modeling.pruned_cnn
    import ...`) is what imports transformers: registering then would meet a half-initialized family, so it waits
    until that package is complete.
    """

    def find_spec(self, fullname: str, path=None, target: ModuleType | None = None):
        if fullname != "transformers" and fullname not in _FAMILY_PACKAGES:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        family = fullname in _FAMILY_PACKAGES

        def exec_then_register(module: ModuleType) -> None:
            _hook_state["families_loading"] += family
            try:
                exec_module(module)
            finally:
                _hook_state["families_loading"] -= family
            _register_when_ready()

        # Patched on this spec's own loader instance (a fresh one per lookup): a spec found but never executed, as
        # by `importlib.util.find_spec("transformers")` availability checks, leaves the hook in place.
        spec.loader.exec_module = exec_then_register
        return spec


def _register_when_ready() -> None:
    """Registers the families once transformers is imported and no family package is half-initialized."""
    if "transformers" not in sys.modules or _hook_state["families_loading"] or _hook_state["registering"]:
        return
    _hook_state["registering"] = True  # registering imports the other families, whose hooks must not recurse
    try:
        register_families()
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterTransformers)]
    finally:
        _hook_state["registering"] = False


def register_on_import() -> None:
    """Registers the families now when transformers is imported already, else right after it is."""
    if "transformers" in sys.modules:
        register_families()
    elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())
