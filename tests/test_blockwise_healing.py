"""Block-wise distillation (`hf_compress.healing.blockwise`), the optional first stage of healing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama
from hf_compress.modeling.shared_basis_llama import SharedBasisLlamaForCausalLM
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_compress.errors import HFCompressError
from hf_compress.healing import HealConfig, blockwise, heal
from hf_compress.healing.blockwise import (
    BlockRecord,
    BlockwiseResult,
    _Decoder,
    block_parameters,
    blockwise_distill,
    layer_blocks,
)
from hf_compress.healing.trainer import state_dir_for

pytestmark = pytest.mark.usefixtures("one_thread")


def config_of(groups: dict[str, list[list[int]]], layers: int) -> SimpleNamespace:
    return SimpleNamespace(num_hidden_layers=layers, basis_groups=groups)


def test_blocks_are_the_shortest_runs_that_share_no_basis_with_others():
    pairs = {"q_proj": [[0, 1], [2, 3]], "down_proj": [[0], [1], [2], [3]]}
    assert layer_blocks(config_of(pairs, 4)) == [(0, 2), (2, 4)]
    # Groups of two types that overlap tie their layers together: 0-2 by q, 2-3 by k.
    overlapping = {"q_proj": [[0, 1, 2], [3]], "k_proj": [[0], [1], [2, 3]]}
    assert layer_blocks(config_of(overlapping, 5)) == [(0, 4), (4, 5)]
    assert layer_blocks(config_of({"o_proj": [[0], [1], [2]]}, 3)) == [(0, 1), (1, 2), (2, 3)]
    assert layer_blocks(config_of({}, 2)) == [(0, 1), (1, 2)]


def layer_outputs_by_hooks(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's output, caught by hooks on the model's own forward."""
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
               for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return outputs


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_span_of_layers_run_alone_matches_the_models_own_forward(tiny_shared_basis_checkpoint, attention):
    torch.manual_seed(0)
    for model in (tiny_llama(vocab_size=300), SharedBasisLlamaForCausalLM.from_pretrained(tiny_shared_basis_checkpoint)):
        model.config._attn_implementation = attention
        model.eval()
        ids = torch.randint(0, 256, (2, 24))
        expected = layer_outputs_by_hooks(model, ids)
        run = _Decoder(model)
        with torch.no_grad():
            hidden = model.get_input_embeddings()(ids)
            first = run(hidden, 0, 1)
            rest = run(first, 1, len(expected))
        torch.testing.assert_close(first, expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rest, expected[-1], rtol=1e-5, atol=1e-5)


def relative_error(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean over positions of |s - t|^2 / |t|^2, in float64."""
    s, t = student.double().flatten(0, 1), teacher.double().flatten(0, 1)
    return float(((s - t).norm(dim=-1) ** 2 / t.norm(dim=-1) ** 2).mean())


@pytest.fixture()
def pair(tiny_shared_basis_checkpoint, tiny_source_dir):
    student = SharedBasisLlamaForCausalLM.from_pretrained(tiny_shared_basis_checkpoint, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_source_dir, dtype=torch.float32).eval()
    return student, teacher


def test_blockwise_lowers_every_blocks_error_and_records_it_exactly(pair):
    student, teacher = pair
    start = {k: v.clone() for k, v in student.state_dict().items()}
    torch.manual_seed(1)
    sequences = torch.randint(0, 256, (6, 16))
    before = [relative_error(s, t) for s, t in zip(layer_outputs_by_hooks(student, sequences),
                                                   layer_outputs_by_hooks(teacher, sequences))]
    config = HealConfig(block_tokens=6 * 16, seq_len=16, block_epochs=3, block_lr=1e-3, block_batch_size=4,
                        dtype="float32")
    result = blockwise_distill(student, teacher, sequences, config, torch.device("cpu"), progress=False)

    blocks = layer_blocks(student.config)
    assert [tuple(b.layers) for b in result.blocks] == [(first, end - 1) for first, end in blocks]
    assert result.sequences == 6 and result.tokens == 96 and result.steps_per_block == 3 * 2
    assert result.error_sequences == 6  # fewer than ERROR_SEQUENCES: the errors are over every sequence
    after = [relative_error(s, t) for s, t in zip(layer_outputs_by_hooks(student, sequences),
                                                  layer_outputs_by_hooks(teacher, sequences))]
    for block, (first, end) in zip(result.blocks, blocks):
        # The record is the error at the block's last layer, over the stage's sequences, of the model as it is now
        # (later blocks do not change it) ...
        assert block.error_after == pytest.approx(after[end - 1], rel=1e-4)
        # ... and it went down from the error of the model as the earlier blocks left it.
        assert block.error_after < block.error_before
    assert result.blocks[0].error_before == pytest.approx(before[blocks[0][1] - 1], rel=1e-4)
    assert after[-1] < 0.8 * before[-1]

    # Only the factors and norms moved; the embeddings (the tied head) did not.
    end_state = student.state_dict()
    moved = {k for k in start if not torch.equal(start[k], end_state[k])}
    assert "model.embed_tokens.weight" not in moved
    assert any(k.startswith("model.shared_bases.") for k in moved)
    assert any(k.endswith("coefficients") for k in moved) and any("layernorm" in k for k in moved)
    # No gradient flag is left changed (the loaded model's are all on), and the bases are still each one tensor
    # that the members share.
    assert all(p.requires_grad for p in student.parameters())
    for layer_idx, layer in enumerate(student.model.layers):
        basis = student.model.shared_bases["q_proj"][student.config.group_of("q_proj", layer_idx)]
        assert layer.self_attn.q_proj.basis is basis


def test_block_parameters_are_the_blocks_factors_and_norms_once_each(pair):
    student, _ = pair
    first, end = layer_blocks(student.config)[0]
    params = block_parameters(student, first, end)
    assert len({id(p) for p in params}) == len(params)
    names = {id(p): n for n, p in student.named_parameters()}
    named = sorted(names[id(p)] for p in params)
    expected = sorted(n for n, _ in student.named_parameters()
                      if any(n.startswith(f"model.layers.{i}.") for i in range(first, end))
                      and ("coefficients" in n or "layernorm" in n or n.endswith(".bias")))
    bases = {names[id(m.basis.weight)] for i in range(first, end) for m in student.model.layers[i].modules()
             if type(m).__name__ == "SharedBasisLinear"}
    assert named == sorted(expected + sorted(bases))


def small_config(calib_file: Path, **overrides) -> HealConfig:
    kwargs = {"tokens": 6 * 4 * 32, "seq_len": 32, "batch_size": 4, "lr": 3e-4, "warmup_ratio": 0.0, "loss": "kl",
              "dataset": str(calib_file), "dtype": "float32", "kl_chunk": 7, "save_steps": 1000,
              "block_tokens": 5 * 32, "block_epochs": 2, "block_lr": 3e-4, "block_batch_size": 2}
    kwargs.update(overrides)
    return HealConfig(**kwargs)


class Interrupt:
    def __init__(self, at: int):
        self.at, self.steps = at, []

    def __call__(self, step: int, loss: float) -> None:
        self.steps.append(step)
        if step == self.at:
            raise KeyboardInterrupt


def test_heal_runs_the_stage_first_records_it_and_resumes_without_it(tiny_shared_basis_checkpoint, tiny_source_dir,
                                                                     calib_file, tmp_path, monkeypatch):
    from hf_compress.healing import trainer

    calls = []
    real = trainer.blockwise_distill
    monkeypatch.setattr(trainer, "blockwise_distill", lambda *a, **k: calls.append(a[2].clone()) or real(*a, **k))
    run = {"teacher": str(tiny_source_dir), "device": "cpu", "progress": False}
    config = small_config(calib_file, save_steps=2)
    out = tmp_path / "healed"
    with pytest.raises(KeyboardInterrupt):
        heal(tiny_shared_basis_checkpoint, out, config=config, on_step=Interrupt(at=3), **run)
    state = json.loads((state_dir_for(out) / "state.json").read_text())
    assert state["step"] == 2 and state["blockwise"]["sequences"] == 5
    resumed = heal(tiny_shared_basis_checkpoint, out, config=config, **run)
    # The stage ran in the first session only: the saved weights hold what it trained.
    assert len(calls) == 1 and resumed.resumed_from == 2

    straight = heal(tiny_shared_basis_checkpoint, tmp_path / "straight", config=config, **run)
    assert len(calls) == 2
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # It trained on the run's first five sequences, those the end-to-end stage starts with.
    assert torch.equal(calls[0], calls[1]) and calls[0].shape == (5, 32)
    record = json.loads((tmp_path / "straight" / "config.json").read_text())["compression"]["healing"]
    assert record["blockwise"] == straight.provenance["healing"]["blockwise"]
    assert record["blockwise"]["tokens"] == 160 and record["blockwise"]["epochs"] == 2
    assert record["options"]["block_tokens"] == 160
    assert all(b["error_after"] < b["error_before"] for b in record["blockwise"]["blocks"])

    # Without the stage, the same run heals to other weights.
    plain = heal(tiny_shared_basis_checkpoint, tmp_path / "plain", config=small_config(calib_file, block_tokens=0),
                 **run)
    assert "blockwise" not in plain.provenance["healing"]
    c = load_file(tmp_path / "plain" / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.fixture(scope="module")
def four_block_checkpoint(tmp_path_factory, tiny_source_dir, calib_file) -> Path:
    """The tiny source converted with every layer its own bases: four blocks of one layer."""
    from hf_compress.basis_sharing.api import convert
    from hf_compress.basis_sharing.config import BasisSharingConfig, CalibrationConfig

    out = tmp_path_factory.mktemp("converted") / "tiny-g1"
    convert(str(tiny_source_dir), out, BasisSharingConfig(ratio=0.3, group_size=1),
            calibration=CalibrationConfig(dataset=str(calib_file), samples=8, seq_len=32), progress=False)
    return out


def test_an_interrupted_stage_resumes_after_its_last_saved_block_to_the_same_weights(
        four_block_checkpoint, tiny_source_dir, calib_file, tmp_path, monkeypatch):
    from hf_compress.healing import trainer

    saved, given = [], []  # blocks recorded at each save; what each stage was given as done
    real_save, real_distill = trainer.save_stage, trainer.blockwise_distill

    def save_then_maybe_stop(folder, student, result, fingerprint, stop_after=None):
        real_save(folder, student, result, fingerprint)
        saved.append(len(result.blocks))
        if len(result.blocks) == stop_after:
            raise KeyboardInterrupt

    def stopping_after(blocks):
        monkeypatch.setattr(trainer, "save_stage", lambda *a: save_then_maybe_stop(*a, stop_after=blocks))

    monkeypatch.setattr(trainer, "blockwise_distill",
                        lambda *a, **k: given.append(k["done"]) or real_distill(*a, **k))
    student, run = str(four_block_checkpoint), {"teacher": str(tiny_source_dir), "device": "cpu", "progress": False}
    config = small_config(calib_file, dtype="bfloat16")  # the training saves no state of its own (save_steps 1000)
    out = tmp_path / "healed"
    stage = state_dir_for(out) / "blockwise"
    stopping_after(2)
    with pytest.raises(KeyboardInterrupt):
        heal(student, out, config=config, **run)
    assert not out.exists() and saved == [1, 2] and given == [None]
    record = json.loads((stage / "stage.json").read_text())["record"]
    assert [b["layers"] for b in record["blocks"]] == [[0, 0], [1, 1]]
    # Each block's file holds that layer's coefficients and norms and the bases of its groups, nothing else.
    groups = json.loads((four_block_checkpoint / "config.json").read_text())["basis_groups"]
    for layer in (0, 1):
        keys = set(load_file(stage / f"block-{layer}-{layer}.safetensors"))
        bases = {f"model.shared_bases.{kind}.{index}.weight" for kind, of_kind in groups.items()
                 for index, group in enumerate(of_kind) if layer in group}
        assert len(bases) == len(groups) and {k for k in keys if k.startswith("model.shared_bases.")} == bases
        assert keys - bases and all(k.startswith(f"model.layers.{layer}.") for k in keys - bases)
    assert sorted(p.name for p in stage.iterdir()) == ["block-0-0.safetensors", "block-1-1.safetensors", "stage.json"]

    # The rerun trains blocks 2 and 3 alone, after recomputing what blocks 0 and 1 output; stopped in the training
    # before it saves any state, it leaves the whole stage saved ...
    stopping_after(None)
    with pytest.raises(KeyboardInterrupt):
        heal(student, out, config=config, on_step=Interrupt(at=1), **run)
    assert saved == [1, 2, 3, 4] and [b.layers for b in given[1].blocks] == [(0, 0), (1, 1)]
    # ... which the next rerun loads whole, training no block.
    resumed = heal(student, out, config=config, **run)
    assert saved == [1, 2, 3, 4] and len(given[2].blocks) == 4
    assert not state_dir_for(out).exists()
    straight = heal(student, tmp_path / "straight", config=config, **run)
    assert saved == [1, 2, 3, 4] * 2
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.provenance["healing"]["blockwise"]["blocks"] == straight.provenance["healing"]["blockwise"]["blocks"]
    assert resumed.losses == straight.losses

    # A saved stage of another run (another fingerprint) is not resumed: the stage starts again from block 0.
    again = tmp_path / "again"
    stage = state_dir_for(again) / "blockwise"
    stopping_after(3)
    with pytest.raises(KeyboardInterrupt):
        heal(student, again, config=config, **run)
    meta = json.loads((stage / "stage.json").read_text())
    (stage / "stage.json").write_text(json.dumps({**meta, "fingerprint": "another run"}))
    stopping_after(1)
    with pytest.raises(KeyboardInterrupt):
        heal(student, again, config=config, **run)
    assert saved[-4:] == [1, 2, 3, 1] and given[-1] is None
    assert sorted(p.name for p in stage.iterdir()) == ["block-0-0.safetensors", "stage.json"]


def test_block_errors_are_measured_on_the_first_sequences_and_do_not_change_the_training(
        pair, tiny_shared_basis_checkpoint, monkeypatch):
    student, teacher = pair
    twin = SharedBasisLlamaForCausalLM.from_pretrained(tiny_shared_basis_checkpoint, dtype=torch.float32)
    torch.manual_seed(3)
    sequences = torch.randint(0, 256, (6, 16))
    config = HealConfig(block_tokens=6 * 16, seq_len=16, block_epochs=2, block_lr=1e-3, block_batch_size=4,
                        dtype="float32")
    blocks = layer_blocks(student.config)
    before = [relative_error(s, t) for s, t in zip(layer_outputs_by_hooks(student, sequences[:2]),
                                                   layer_outputs_by_hooks(teacher, sequences[:2]))]
    everywhere = blockwise_distill(twin, teacher, sequences, config, torch.device("cpu"), progress=False)
    monkeypatch.setattr(blockwise, "ERROR_SEQUENCES", 2)
    probed = blockwise_distill(student, teacher, sequences, config, torch.device("cpu"), progress=False)

    assert probed.error_sequences == 2 and everywhere.error_sequences == 6
    # The training is the same (the measurement draws nothing and changes nothing) ...
    for (name, p), q in zip(student.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    # ... and the records are the errors over the first two sequences, which differ from those over all six.
    after = [relative_error(s, t) for s, t in zip(layer_outputs_by_hooks(student, sequences[:2]),
                                                  layer_outputs_by_hooks(teacher, sequences[:2]))]
    for block, whole, (first, end) in zip(probed.blocks, everywhere.blocks, blocks):
        assert block.error_after == pytest.approx(after[end - 1], rel=1e-4)
        assert block.error_after != pytest.approx(whole.error_after, rel=1e-3)
    assert probed.blocks[0].error_before == pytest.approx(before[blocks[0][1] - 1], rel=1e-4)
    assert probed.blocks[0].error_before != pytest.approx(everywhere.blocks[0].error_before, rel=1e-3)


def test_a_stage_given_another_stages_record_refuses_it(pair):
    student, teacher = pair
    config = HealConfig(block_tokens=6 * 16, seq_len=16, block_epochs=1, block_batch_size=4, dtype="float32")
    start = {k: v.clone() for k, v in student.state_dict().items()}
    other_sequences = BlockwiseResult(sequences=5, tokens=80, epochs=1, steps_per_block=2, error_sequences=5,
                                      blocks=[BlockRecord((0, 1), 0.5, 0.4)])
    other_blocks = BlockwiseResult(sequences=6, tokens=96, epochs=1, steps_per_block=2,  # this stage's counts
                                   error_sequences=6,
                                   blocks=[BlockRecord((0, 0), 0.5, 0.4)])  # the student's first block is 0-1
    for other in (other_sequences, other_blocks):
        with pytest.raises(ValueError, match="not this one"):
            blockwise_distill(student, teacher, torch.randint(0, 256, (6, 16)), config, torch.device("cpu"),
                              progress=False, done=other)
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())


def test_bad_block_options_and_teachers_fail_with_one_line(tiny_shared_basis_checkpoint, calib_file):
    for options, match in (({"block_tokens": -1}, "--block-tokens must be >= 0"),
                           ({"block_epochs": 0}, "--block-epochs must be >= 1"),
                           ({"block_lr": 0.0}, "--block-lr must be > 0"),
                           ({"block_batch_size": 0}, "--block-batch-size must be >= 1")):
        with pytest.raises(HFCompressError, match=match) as err:
            small_config(calib_file, **options).validate()
        assert "\n" not in str(err.value)

    student = SharedBasisLlamaForCausalLM.from_pretrained(tiny_shared_basis_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_shared_basis_checkpoint)
    shallow = tiny_llama(vocab_size=student.config.vocab_size, num_hidden_layers=2)
    with pytest.raises(HFCompressError, match="--block-tokens trains the student's layers") as err:
        heal(student, None, teacher=shallow, tokenizer=tokenizer, config=small_config(calib_file), device="cpu",
             progress=False)
    assert "\n" not in str(err.value) and "the teacher has 2 layers" in str(err.value)

    # A sliding window shorter than the sequences is another mask than the stage's full causal one.
    windowed = tiny_llama(vocab_size=student.config.vocab_size)
    windowed.config.sliding_window = 16
    with pytest.raises(HFCompressError, match=r"sliding window \(16\) is shorter than --seq-len 32") as err:
        heal(student, None, teacher=windowed, tokenizer=tokenizer, config=small_config(calib_file), device="cpu",
             progress=False)
    assert "\n" not in str(err.value)
