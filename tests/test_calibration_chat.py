"""Calibration with the source's own chat text (`CalibrationConfig.chat_fraction`, `convert --calib-chat-fraction`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_chat import chat_model, chat_tokenizer

from hf_compress.basis_sharing import BasisSharingConfig, CalibrationConfig, convert
from hf_compress.basis_sharing import api
from hf_compress.data.text import calibration_batch, load_text_option
from hf_compress.errors import HFCompressError
from hf_compress.healing import HealConfig
from hf_compress.healing.chat_data import chat_chunks

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLES, SEQ_LEN = 8, 32


@pytest.fixture(scope="module")
def chat_source_dir(tmp_path_factory):
    """A saved tiny float32 Llama whose tokenizer has ChatML's template, and that writes non-empty free samples."""
    tokenizer = chat_tokenizer()
    path = tmp_path_factory.mktemp("chat-source")
    chat_model(tokenizer, ends_after=None).float().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_chat_samples_count_and_validation():
    assert CalibrationConfig().chat_fraction == 0.0 and CalibrationConfig().chat_samples == 0
    assert CalibrationConfig(samples=128, chat_fraction=0.25).chat_samples == 32
    assert CalibrationConfig(samples=8, chat_fraction=0.01).chat_samples == 1  # any fraction above 0 gives one
    assert CalibrationConfig(samples=8, chat_fraction=1.0).chat_samples == 8
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(HFCompressError, match=r"--calib-chat-fraction must be a number in \[0, 1\]"):
            CalibrationConfig(chat_fraction=bad).validate()
    config = CalibrationConfig(chat_fraction=0.25)
    assert CalibrationConfig.from_dict(config.to_dict()) == config
    # A record written before the option existed reads back as text alone.
    old = {k: v for k, v in config.to_dict().items() if k != "chat_fraction"}
    assert CalibrationConfig.from_dict(old).chat_fraction == 0.0


def test_convert_calibrates_on_the_sources_chat_text(chat_source_dir, calib_file, tmp_path, monkeypatch):
    seen = []
    real_compress = api._compress

    def spy(inputs, *args, **kwargs):
        seen.append(inputs.ids.clone())
        return real_compress(inputs, *args, **kwargs)

    monkeypatch.setattr(api, "_compress", spy)
    calibration = CalibrationConfig(dataset=str(calib_file), samples=SAMPLES, seq_len=SEQ_LEN, dtype="float32",
                                    chat_fraction=0.25)
    config = BasisSharingConfig(ratio=0.3)
    with_chat = convert(str(chat_source_dir), tmp_path / "chat", config, calibration=calibration, device="cpu",
                        progress=False)
    text_only = convert(str(chat_source_dir), tmp_path / "text", config, device="cpu", progress=False,
                        calibration=CalibrationConfig(**{**calibration.to_dict(), "chat_fraction": 0.0}))
    assert with_chat.output_dir and text_only.output_dir

    # What the calibration ran on, computed independently: 6 chunks of the text as drawn without chat, then 2
    # chunks of free chat text written by the source with healing's chat options under the calibration's seed.
    tokenizer = chat_tokenizer()
    text = calibration_batch(tokenizer, load_text_option("--calib-dataset", str(calib_file)), samples=SAMPLES,
                             seq_len=SEQ_LEN, seed=calibration.seed)
    chat = chat_chunks(chat_model(tokenizer, ends_after=None).float(), tokenizer,
                       HealConfig(seq_len=SEQ_LEN, seed=calibration.seed), 2, progress=False)
    assert torch.equal(seen[1], text)
    assert torch.equal(seen[0], torch.cat([text[:6], chat]))
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (seen[0][6:] == im_start).any() and not (text == im_start).any()

    # The record says what the Grams saw, and the chat text changed the factors.
    records = [json.loads((tmp_path / name / "config.json").read_text())["compression"] for name in ("chat", "text")]
    assert records[0]["calibration"]["chat_fraction"] == 0.25 and records[1]["calibration"]["chat_fraction"] == 0.0
    a, b = load_file(tmp_path / "chat" / "model.safetensors"), load_file(tmp_path / "text" / "model.safetensors")
    assert a.keys() == b.keys()
    basis = next(key for key in a if "shared_bases" in key)
    assert not torch.equal(a[basis], b[basis])
