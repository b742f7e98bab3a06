"""A fast `hf-compress --help` (neither torch nor transformers imported), and the families registered with the Auto
classes whichever import comes first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_python(code: str) -> str:
    """`code` in a fresh interpreter of this venv; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_help_imports_neither_torch_nor_transformers():
    out = run_python(
        "import io, json, sys\nfrom contextlib import redirect_stdout\n"
        "sys.argv = ['hf-compress', '--help']\nfrom hf_compress.cli import main\nbuffer = io.StringIO()\n"
        "try:\n    with redirect_stdout(buffer):\n        main()\nexcept SystemExit:\n    pass\n"
        "print(json.dumps({'heavy': sorted({'torch', 'transformers'} & set(sys.modules)), 'help': buffer.getvalue()}))\n")
    result = json.loads(out.splitlines()[-1])
    assert result["heavy"] == []
    for command in ("convert", "ppl", "push", "eval", "card", "train", "prune", "early-exit", "exit-report", "heal"):
        assert f" {command} " in result["help"], command


def test_listed_help_is_each_commands_own():
    """The listing reads the docstrings from the sources; it must say what the loaded commands say."""
    from hf_compress.cli import COMMAND_MODULES, _load_commands, command_index

    loaded = {name: command for module in COMMAND_MODULES for name, command in _load_commands(module).items()}
    assert list(command_index()) == list(loaded)
    for name, (_, doc) in command_index().items():
        assert doc and doc == loaded[name].help, name


def test_commands_still_run_through_the_lazy_group(tmp_path):
    from typer.testing import CliRunner

    from hf_compress.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["card", str(tmp_path)])
    assert ok.exit_code != 0 and "config.json" in str(ok.exception)  # the real command ran and refused the folder
    typo = runner.invoke(app, ["convrt"])
    assert typo.exit_code == 2 and "Did you mean 'convert'?" in typo.output


REGISTERED = (
    "import json, transformers\n"
    "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification\n"
    "mapped = lambda auto, t: type(AutoConfig.for_model(t)) in auto._model_mapping._extra_content\n"
    "print(json.dumps({'configs': [type(AutoConfig.for_model(t)).__name__ for t in "
    "('shared_basis_llama', 'pruned_cnn', 'class_exit_resnet')],\n"
    "  'models': [mapped(AutoModelForCausalLM, 'shared_basis_llama'), mapped(AutoModel, 'shared_basis_llama'),\n"
    "             mapped(AutoModel, 'pruned_cnn'), mapped(AutoModelForImageClassification, 'pruned_cnn'),\n"
    "             mapped(AutoModelForImageClassification, 'class_exit_resnet')]}))\n"
)


@pytest.mark.parametrize("first", [
    "import transformers\nimport hf_compress",
    "import hf_compress\nimport importlib.util\nimportlib.util.find_spec('transformers')\nimport torch",
    "from hf_compress.modeling.pruned_cnn import PrunedCNNConfig",
    "from hf_compress.modeling.shared_basis_llama.configuration_shared_basis_llama import SharedBasisLlamaConfig",
], ids=["transformers-first", "hf_compress-first", "family-first", "family-module-first"])
def test_importing_hf_compress_registers_the_families(first):
    result = json.loads(run_python(first + "\n" + REGISTERED).splitlines()[-1])
    assert result == {"configs": ["SharedBasisLlamaConfig", "PrunedCNNConfig", "ClassExitResNetConfig"],
                      "models": [True] * 5}
