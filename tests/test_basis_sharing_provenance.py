"""The provenance record of a Basis Sharing conversion: the configs it rebuilds, no local paths, the data's hash."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_compress.basis_sharing import BasisSharingConfig, CalibrationConfig, ConversionResult, convert
from hf_compress.basis_sharing.layout import PROJECTIONS, projection
from hf_compress.cards import compression_table
from hf_compress.cli.llm import convert_command
from hf_compress.device import native_bfloat16
from hf_compress.errors import HFCompressError
from hf_compress.provenance import config_from_provenance
from hf_compress.sources import SMOLLM2_ALIAS_ID, SourceInfo

CONFIG = BasisSharingConfig(ratio=0.35, group_size=3, share=("q_proj", "k_proj", "gate_proj"), dense=("down_proj",),
                            rank_allocation="global", rank_score="absolute", layer_fit=False, sequential=False)
CALIBRATION = CalibrationConfig(dataset="calib.txt", samples=6, seq_len=24, seed=7, batch_size=4)


def strings(value):
    """Every string of a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_source_dir, calib_file):
    """`(result, output folder, calibration file)` of a conversion with a calibration file given by a relative path."""
    work = tmp_path_factory.mktemp("relative")
    shutil.copy(calib_file, work / "calib.txt")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        result = convert(str(tiny_source_dir), work / "out", CONFIG, calibration=CALIBRATION, device="cpu",
                         eval_dataset="calib.txt", eval_seq_len=32, eval_max_windows=2, progress=False)
    return result, work / "out", work / "calib.txt"


def test_the_record_rebuilds_the_resolved_configs(converted):
    result, out, _ = converted
    record = json.loads((out / "config.json").read_text())["compression"]
    assert record["method"] == "basis_sharing"
    # Resolved on the CPU: rank multiples of 1, "auto" as the dtype this CPU multiplies natively.
    assert config_from_provenance(record) == dataclasses.replace(CONFIG, rank_multiple=1)
    dtype = "bfloat16" if native_bfloat16(torch.device("cpu")) else "float32"
    assert CalibrationConfig.from_dict(record["calibration"]) == dataclasses.replace(CALIBRATION, dtype=dtype)
    assert result.provenance == record


def test_no_local_path_is_recorded(converted, tmp_path_factory, tiny_source_dir):
    _, out, _ = converted
    root = str(tmp_path_factory.getbasetemp().resolve())
    record = json.loads((out / "config.json").read_text())
    assert not [s for s in strings(record) if root in s]
    assert record["compression"]["source"] == {"model_id": tiny_source_dir.name, "revision": None, "gguf_file": None}
    # Nor in the perplexity, the evaluation results or the card's compression table (all go to the Hub).
    for name in ("perplexity.json", "eval_results.json"):
        assert root not in (out / name).read_text(), name
    table = compression_table(record)
    assert "calib.txt" in table and root not in table
    assert json.loads((out / "perplexity.json").read_text())["dataset"] == "calib.txt"


def test_the_calibration_file_is_recorded_by_name_and_hash(converted):
    _, out, calib = converted
    data = json.loads((out / "config.json").read_text())["compression"]["data"]
    assert data == [{"role": "calibration", "name": "calib.txt", "split": None,
                     "sha256": hashlib.sha256(calib.read_bytes()).hexdigest()}]


def test_the_figures_count_the_saved_checkpoint(converted, tiny_source_dir):
    result, out, _ = converted
    record = result.provenance
    source = AutoModelForCausalLM.from_pretrained(tiny_source_dir)
    saved = AutoModelForCausalLM.from_pretrained(out)
    compressed = [name for name in PROJECTIONS if name != "down_proj"]
    before = sum(projection(layer, name).weight.numel() for layer in source.model.layers for name in compressed)
    after = sum(p.numel() for n, p in saved.named_parameters() if "shared_bases" in n or "coefficients" in n)
    assert (record["params_before"], record["params_after"]) == (before, after)
    assert record["achieved_ratio"] == pytest.approx(1 - after / before, abs=1e-6)
    assert record["total_params_before"] == sum(p.numel() for p in source.parameters())
    assert record["total_params_after"] == sum(p.numel() for p in saved.parameters())
    assert record["target_ratio"] == 0.35
    # The result reads its ratios and counts from the record.
    assert (result.target_ratio, result.achieved_ratio, result.params_before, result.params_after) == (
        0.35, record["achieved_ratio"], before, after)
    assert "target_ratio" not in {f.name for f in dataclasses.fields(ConversionResult)}


def test_configs_round_trip_through_json():
    for config in (CONFIG, BasisSharingConfig(rank_multiple=16), CALIBRATION, CalibrationConfig(split="test")):
        data = json.loads(json.dumps(config.to_dict()))
        assert type(config).from_dict(data) == config
    assert CONFIG.to_dict()["share"] == ["q_proj", "k_proj", "gate_proj"]
    with pytest.raises(HFCompressError, match=r"CalibrationConfig has no field\(s\) \['path'\]"):
        CalibrationConfig.from_dict({"path": "x"})


@pytest.mark.parametrize("config,message", [
    (BasisSharingConfig(ratio=0.0), "--ratio must be in (0, 1); got 0.0."),
    (BasisSharingConfig(ratio=1.0), "--ratio must be in (0, 1); got 1.0."),
    (BasisSharingConfig(group_size=0), "--group-size must be >= 1; got 0."),
    (BasisSharingConfig(share=("q_proj", "foo")), "--share names unknown projection(s) ['foo']"),
    (BasisSharingConfig(dense=("bar",)), "--dense names unknown projection(s) ['bar']"),
    (BasisSharingConfig(dense=("q_proj",)), "projection(s) ['q_proj'] are both shared and dense."),
    (BasisSharingConfig(share=(), dense=PROJECTIONS), "--dense names every projection: nothing to compress."),
    (BasisSharingConfig(rank_allocation="best"), "--rank-allocation must be 'uniform' or 'global'; got 'best'."),
    (BasisSharingConfig(rank_score="max"), "--rank-score must be 'relative' or 'absolute'; got 'max'."),
    (BasisSharingConfig(rank_multiple=0), "--rank-multiple must be >= 1; got 0."),
    (CalibrationConfig(samples=0), "--calib-samples must be >= 1; got 0."),
    (CalibrationConfig(seq_len=-3), "--calib-seq-len must be >= 1; got -3."),
    (CalibrationConfig(batch_size=0), "--batch-size must be >= 1; got 0."),
    (CalibrationConfig(dtype="float16"), "--calib-dtype must be one of auto, float32, bfloat16; got 'float16'"),
])
def test_validate_names_the_bad_option(config, message):
    with pytest.raises(HFCompressError) as err:
        config.validate()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_validate_and_the_layer_count_is_checked_apart():
    BasisSharingConfig().validate()
    CalibrationConfig().validate()
    BasisSharingConfig(group_size=4).check_layers(4)
    with pytest.raises(HFCompressError, match=r"--group-size must be between 1 and the number of layers \(4\); got 5"):
        BasisSharingConfig(group_size=5).check_layers(4)


def test_resolve_fills_the_auto_defaults(monkeypatch):
    assert BasisSharingConfig().resolve(torch.device("cuda")).rank_multiple == 128
    assert BasisSharingConfig().resolve("cpu").rank_multiple == 1
    assert BasisSharingConfig(rank_multiple=8).resolve(torch.device("cuda")).rank_multiple == 8
    assert BasisSharingConfig(share=["q_proj"]).resolve("cpu").share == ("q_proj",)
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr("hf_compress.device.native_bfloat16", lambda device, native=native: native)
        assert CalibrationConfig().resolve("cpu").dtype == expected
        assert CalibrationConfig(dtype="float32").resolve("cpu").dtype == "float32"
    assert CalibrationConfig().dtype == "auto"  # resolve returns a copy


def test_source_refs_name_no_local_path(tmp_path):
    assert SourceInfo(str(tmp_path / "model"), None, None).to_ref().model_id == "model"
    assert SourceInfo(SMOLLM2_ALIAS_ID, "main", "x.gguf").to_ref().model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_cli_defaults_are_the_config_defaults():
    options = {name: p.default.default for name, p in inspect.signature(convert_command).parameters.items()}
    config, calibration = BasisSharingConfig(), CalibrationConfig()
    for name in ("ratio", "group_size", "whiten", "rank_allocation", "rank_multiple", "rank_score", "refit",
                 "layer_fit", "sequential"):
        assert options[name] == getattr(config, name), name
    assert tuple(options["share"].split(",")) == config.share == ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    assert (options["calib_dataset"], options["calib_samples"], options["calib_seq_len"], options["seed"],
            options["batch_size"], options["calib_dtype"]) == (
        calibration.dataset, calibration.samples, calibration.seq_len, calibration.seed, calibration.batch_size,
        calibration.dtype)
