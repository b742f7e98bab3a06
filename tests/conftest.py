"""Shared fixtures: tiny random Llama-family checkpoints with a real (tiny) tokenizer, built offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WIKITEXT = DATA / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet"

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Compression keeps the most useful directions of every weight matrix.",
    "A shared basis serves two consecutive layers; each keeps its own coefficients.",
] * 20


def make_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=0, pad_token_id=None)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    # Random init gives near-identical layers; spread the spectra so truncation choices matter in the tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.logspace(0, -1.5, p.shape[1]).to(p.dtype)[None, :] * 8)
    return model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_source_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny LlamaForCausalLM (GQA, tied embeddings) with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A small local text file for calibration and perplexity (txt: one row per line)."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n".join(TINY_TEXT * 4))
    return path


@pytest.fixture(scope="session")
def tiny_shared_basis_checkpoint(tmp_path_factory, tiny_source_dir, calib_file) -> Path:
    """A saved tiny SharedBasisLlama checkpoint produced by the real converter (ratio 0.3, groups of 2)."""
    from hf_compress.basis_sharing.config import BasisSharingConfig, CalibrationConfig
    from hf_compress.basis_sharing.api import convert

    out = tmp_path_factory.mktemp("converted") / "tiny-bs"
    convert(str(tiny_source_dir), out, BasisSharingConfig(ratio=0.3),
            calibration=CalibrationConfig(dataset=str(calib_file), samples=8, seq_len=32), progress=False)
    return out


def run_python(code: str, cwd: Path, env_extra: dict | None = None) -> str:
    """Runs `code` in a fresh interpreter of this venv in which `hf_compress` cannot be imported."""
    import os
    import subprocess

    prelude = "import sys\nsys.modules['hf_compress'] = None\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Random BN statistics and affine terms: no two filters score alike, and a wrong mapping of any BN tensor
    changes the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            n = m.num_features
            m.weight.data = (torch.rand(n, generator=g) + 0.5).to(m.weight.dtype)
            m.bias.data = (torch.randn(n, generator=g) * 0.1).to(m.weight.dtype)
            m.running_mean = (torch.randn(n, generator=g) * 0.1).to(m.weight.dtype)
            m.running_var = (torch.rand(n, generator=g) + 0.5).to(m.weight.dtype)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (two threads on a busy machine wait on each other); a module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

