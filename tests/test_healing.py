"""Healing (`hf_compress.healing`): distillation of a tiny converted SharedBasisLlama from its tiny source."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, run_python, tiny_llama
from hf_compress.modeling.shared_basis_llama import SharedBasisLlamaForCausalLM
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_compress.errors import HFCompressError
from hf_compress.healing import HealConfig, HealResult, heal
from hf_compress.healing.losses import (
    chunked_kl_loss,
    chunked_lm_loss,
    frozen_head_kl_sum,
    hidden_state_loss,
    kl_lm_loss,
)
from hf_compress.healing.trainer import (
    HealingObjective,
    balance_factors,
    _set_checkpointing,
    mark_trainable,
    relink_bases,
    state_dir_for,
    teacher_states,
)

HELD_OUT = ("Every layer keeps its own useful coefficients, and the lazy fox shares a basis with the quick dog. "
            "Compression keeps two consecutive directions of the brown weight matrix.")


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(calib_file: Path, **overrides) -> HealConfig:
    """16 steps of 4 x 32 tokens in float32 on the tiny text, the KL alone; logit chunks of 7 (not dividing the
    length)."""
    kwargs = {"tokens": 16 * 4 * 32, "seq_len": 32, "batch_size": 4, "lr": 3e-4, "warmup_ratio": 0.0, "loss": "kl",
              "dataset": str(calib_file), "dtype": "float32", "kl_chunk": 7, "save_steps": 1000}
    kwargs.update(overrides)
    return HealConfig(**kwargs)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def load_student(path: Path) -> SharedBasisLlamaForCausalLM:
    return SharedBasisLlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def full_kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> float:
    """KL(teacher || student) per token from whole logits (independent of the chunked loss)."""
    with torch.no_grad():
        log_s = torch.log_softmax(student(ids).logits.double(), -1)
        log_t = torch.log_softmax(teacher(ids).logits.double(), -1)
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def held_out_ids(tokenizer) -> torch.Tensor:
    return tokenizer(HELD_OUT, add_special_tokens=False, return_tensors="pt").input_ids


def safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# --- (1) healing lowers the KL ------------------------------------------------------------------------------------


def test_heal_lowers_kl_on_held_out_text(tiny_shared_basis_checkpoint, tiny_source_dir, calib_file, tmp_path):
    before_hashes = folder_hashes(tiny_shared_basis_checkpoint)
    out = tmp_path / "healed"
    result = heal(tiny_shared_basis_checkpoint, out, teacher=str(tiny_source_dir),
                  config=small_config(calib_file, tokens=32 * 4 * 32), device="cpu", progress=False)

    assert isinstance(result, HealResult) and result.output_dir == out
    assert result.steps == 32 and result.tokens == 32 * 4 * 32 and len(result.losses) == 32
    assert result.tokens_per_s > 0 and result.peak_memory_mb > 0 and result.resumed_from == 0
    teacher = AutoModelForCausalLM.from_pretrained(tiny_source_dir).eval()
    ids = held_out_ids(AutoTokenizer.from_pretrained(tiny_source_dir))
    kl_before = full_kl(load_student(tiny_shared_basis_checkpoint), teacher, ids)
    kl_after = full_kl(load_student(out), teacher, ids)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)

    # The record keeps the conversion's and gains the healing's; local data by name and sha256 only.
    record = json.loads((out / "config.json").read_text())["compression"]
    original = json.loads((tiny_shared_basis_checkpoint / "config.json").read_text())["compression"]
    assert {k: v for k, v in record.items() if k != "healing"} == original
    healing = record["healing"]
    # The tiny tokenizer has no chat template: the default chat fraction "auto" was resolved to 0.0 and recorded so.
    assert healing["options"]["chat_fraction"] == 0.0
    assert HealConfig.from_dict(healing["options"]).resolve("cpu") == small_config(
        calib_file, tokens=32 * 4 * 32, dataset="calib.txt", chat_fraction=0.0)
    assert healing["teacher"]["model_id"] == tiny_source_dir.name
    assert healing["data"] == [{"role": "healing", "name": "calib.txt", "split": None,
                                "sha256": hashlib.sha256(calib_file.read_bytes()).hexdigest()}]
    assert healing["steps"] == 32 and healing["tokens"] == result.tokens and len(healing["loss_history"]) == 32
    assert healing["final_loss"] == pytest.approx(result.final_loss, abs=1e-6)
    assert healing["trainable_params"] == result.trainable_params and healing["wall_time_s"] > 0
    assert str(tmp_path) not in (out / "config.json").read_text()
    for file in ("tokenizer.json", "modeling_shared_basis_llama.py", "README.md"):
        assert (out / file).is_file()
    # The input is untouched and the resumable state is gone.
    assert folder_hashes(tiny_shared_basis_checkpoint) == before_hashes
    assert not state_dir_for(out).exists()


# --- (2) reload: bit-exact, and without the plugin ----------------------------------------------------------------


def test_healed_checkpoint_reloads_exactly_and_without_plugin(tiny_shared_basis_checkpoint, tiny_source_dir,
                                                              calib_file, tmp_path):
    student = load_student(tiny_shared_basis_checkpoint)  # in memory: trained in place; tokenizer from the teacher
    out = tmp_path / "healed"
    heal(student, out, teacher=str(tiny_source_dir), config=small_config(calib_file, tokens=6 * 4 * 32,
         loss="kl+lm", lm_weight=0.5, lr=1e-3), device="cpu", progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is SharedBasisLlamaForCausalLM
    trained, saved = student.state_dict(), reloaded.state_dict()
    assert trained.keys() == saved.keys()
    assert all(torch.equal(trained[k], saved[k]) for k in trained)
    assert not torch.equal(saved["model.shared_bases.q_proj.0.weight"],
                           load_student(tiny_shared_basis_checkpoint).model.shared_bases["q_proj"][0].weight)

    ids = held_out_ids(AutoTokenizer.from_pretrained(out))
    torch.save(ids, tmp_path / "ids.pt")
    code = f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'remote.pt')!r})
"""
    run_python(code, cwd=tmp_path)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "remote.pt"), reloaded(ids).logits)


# --- (3) shared bases stay shared ---------------------------------------------------------------------------------


def _members(student, name: str, group: int) -> list[nn.Module]:
    layers = student.model.layers
    parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return [getattr(getattr(layers[i], parent), name) for i in student.config.basis_groups[name][group]]


def test_shared_basis_gradient_is_the_sum_over_its_members(tiny_shared_basis_checkpoint, tiny_source_dir,
                                                           calib_file):
    student, teacher = load_student(tiny_shared_basis_checkpoint), AutoModelForCausalLM.from_pretrained(tiny_source_dir)
    config = small_config(calib_file, loss="kl+lm", lm_weight=0.7)
    mark_trainable(student)
    objective = HealingObjective(student, teacher.get_output_embeddings(), config)
    torch.manual_seed(0)
    ids = torch.randint(0, student.config.vocab_size, (2, 24))
    hidden, _ = teacher_states(teacher, ids)
    name = "gate_proj"
    assert len(student.config.basis_groups[name][0]) == 2
    shared = student.model.shared_bases[name][0]
    objective(ids, hidden).backward()
    shared_grad = shared.weight.grad.clone()

    # The same loss with every member on its own copy of the basis: each copy's gradient is that member's share.
    student.zero_grad(set_to_none=True)
    copies = []
    for member in _members(student, name, 0):
        copy = nn.Linear(shared.in_features, shared.out_features, bias=False)
        copy.weight.data.copy_(shared.weight.data)
        object.__setattr__(member, "basis", copy)
        copies.append(copy)
    objective(ids, hidden).backward()
    assert shared.weight.grad is None
    torch.testing.assert_close(shared_grad, sum(c.weight.grad for c in copies), rtol=1e-5, atol=1e-7)
    assert all(c.weight.grad.abs().sum() > 0 for c in copies)
    relink_bases(student)
    assert all(m.basis is shared for m in _members(student, name, 0))


def test_shared_bases_remain_one_parameter_after_training(tiny_shared_basis_checkpoint, tiny_source_dir, calib_file,
                                                          tmp_path):
    student = load_student(tiny_shared_basis_checkpoint)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    heal(student, tmp_path / "healed", teacher=str(tiny_source_dir),
         config=small_config(calib_file, tokens=4 * 4 * 32, lr=1e-3, gradient_checkpointing=True), device="cpu",
         progress=False)
    bases = student.model.shared_bases
    state = student.state_dict()
    saved = safetensors_of(tmp_path / "healed")
    assert state.keys() == initial.keys() and saved.keys() == safetensors_of(tiny_shared_basis_checkpoint).keys()
    for name, groups in student.config.basis_groups.items():
        for group_idx in range(len(groups)):
            key = f"model.shared_bases.{name}.{group_idx}.weight"
            assert [k for k in state if f".{name}.{group_idx}." in k and "shared_bases" in k] == [key]
            assert not torch.equal(state[key], initial[key])  # it trained
            for member in _members(student, name, group_idx):
                assert member.basis is bases[name][group_idx]
                assert member.basis.weight.data_ptr() == bases[name][group_idx].weight.data_ptr()
    assert not any(".basis." in k for k in state)
    assert not student.model.gradient_checkpointing and not student.training
    # Frozen: embeddings (tied head).
    assert torch.equal(state["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    # The norms and coefficients trained.
    assert not torch.equal(state["model.norm.weight"], initial["model.norm.weight"])
    assert not torch.equal(state["model.layers.1.mlp.up_proj.coefficients"],
                           initial["model.layers.1.mlp.up_proj.coefficients"])


def test_factors_mark_the_bases_coefficients_and_norms_trainable_and_nothing_else(tiny_shared_basis_checkpoint):
    student = load_student(tiny_shared_basis_checkpoint)
    mark_trainable(student)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    # Independently, by name: each basis once (stored in shared_bases), every coefficient matrix, every RMSNorm.
    expected = {n for n, _ in student.named_parameters()
                if n.startswith("model.shared_bases.") or n.endswith((".coefficients", "norm.weight"))}
    assert trainable == expected
    assert len([n for n in expected if n.endswith("norm.weight")]) == 2 * student.config.num_hidden_layers + 1
    assert "model.embed_tokens.weight" not in trainable
    assert student.get_input_embeddings().weight.requires_grad is False


def test_all_trains_the_embeddings_and_tied_head_as_one_tensor_with_the_factors(
        tiny_shared_basis_checkpoint, tiny_source_dir, calib_file, tmp_path):
    """`trainable="all"`: every parameter moves, the tied head stays the embeddings' one tensor (saved once), the
    bases stay shared, and the KL to the teacher on held-out text falls."""
    student = load_student(tiny_shared_basis_checkpoint)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied in the tiny checkpoint
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    teacher = AutoModelForCausalLM.from_pretrained(tiny_source_dir).eval()
    ids = held_out_ids(AutoTokenizer.from_pretrained(tiny_source_dir))
    kl_before = full_kl(student, teacher, ids)
    result = heal(student, tmp_path / "healed", teacher=str(tiny_source_dir),
                  config=small_config(calib_file, tokens=32 * 4 * 32, trainable="all"),
                  device="cpu", progress=False)
    assert result.trainable_params == sum(p.numel() for p in student.parameters())  # tied: counted once
    state = student.state_dict()
    moved = [k for k in state if not torch.equal(state[k], initial[k])]
    assert set(moved) == set(initial)  # every weight trained, the embeddings among them
    assert student.lm_head.weight is student.model.embed_tokens.weight
    for name, groups in student.config.basis_groups.items():
        for group_idx in range(len(groups)):
            assert all(m.basis is student.model.shared_bases[name][group_idx]
                       for m in _members(student, name, group_idx))
    saved = safetensors_of(tmp_path / "healed")
    assert saved.keys() == safetensors_of(tiny_shared_basis_checkpoint).keys()  # the head is not saved apart
    assert torch.equal(saved["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert full_kl(student, teacher, ids) < 0.8 * kl_before
    record = json.loads((tmp_path / "healed" / "config.json").read_text())["compression"]["healing"]
    assert record["options"]["trainable"] == "all" and record["trainable_params"] == result.trainable_params


# --- (4) resume ---------------------------------------------------------------------------------------------------


class Interrupt:
    """An `on_step` hook that records the steps and raises KeyboardInterrupt after step `at`."""

    def __init__(self, at: int | None = None):
        self.at, self.steps = at, []

    def __call__(self, step: int, loss: float) -> None:
        self.steps.append(step)
        if step == self.at:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_same_weights(tiny_shared_basis_checkpoint, tiny_source_dir, calib_file,
                                                     tmp_path):
    # Balanced factors: a resumed session balances the loaded student again before the saved weights replace them.
    config = small_config(calib_file, tokens=8 * 4 * 32, lr=1e-3, warmup_ratio=0.25, save_steps=3, loss="kl+lm",
                          lm_weight=0.3, balance_factors=True)
    run = {"teacher": str(tiny_source_dir), "device": "cpu", "progress": False}
    out, state = tmp_path / "healed", state_dir_for(tmp_path / "healed")

    with pytest.raises(KeyboardInterrupt):
        heal(tiny_shared_basis_checkpoint, out, config=config, on_step=Interrupt(at=5), **run)
    assert not out.exists()
    assert json.loads((state / "state.json").read_text())["step"] == 3
    assert not [p for p in tmp_path.iterdir() if ".incomplete-" in p.name]

    # A saved state of other settings is not resumed (and is replaced).
    hook = Interrupt(at=4)
    with pytest.raises(KeyboardInterrupt):
        heal(tiny_shared_basis_checkpoint, out, config=small_config(calib_file, tokens=8 * 4 * 32, lr=2e-3,
             save_steps=3), on_step=hook, **run)
    assert hook.steps[0] == 1 and json.loads((state / "state.json").read_text())["step"] == 3
    with pytest.raises(KeyboardInterrupt):
        heal(tiny_shared_basis_checkpoint, out, config=config, on_step=Interrupt(at=7), **run)
    assert json.loads((state / "state.json").read_text())["step"] == 6

    hook = Interrupt()
    resumed = heal(tiny_shared_basis_checkpoint, out, config=config, on_step=hook, **run)
    assert resumed.resumed_from == 6 and hook.steps == [7, 8]
    assert not state.exists()

    straight = heal(tiny_shared_basis_checkpoint, tmp_path / "straight", config=config, **run)
    assert resumed.losses == straight.losses and len(straight.losses) == 8
    a, b = safetensors_of(out), safetensors_of(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- (5) chunked losses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_kl_equals_full_kl(temperature):
    torch.manual_seed(0)
    batch, length, vocab = 2, 10, 11
    student_head = nn.Linear(6, vocab, bias=False).double()
    teacher_head = nn.Linear(5, vocab, bias=False).double()
    student_hidden = torch.randn(batch, length, 6, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, 5, dtype=torch.float64)

    log_s = F.log_softmax(student_head(student_hidden) / temperature, -1)
    log_t = F.log_softmax(teacher_head(teacher_hidden) / temperature, -1)
    full = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2
    grads = torch.autograd.grad(full, (student_hidden, student_head.weight))
    for chunk in (1, 3, 4, 10, 64):
        value = chunked_kl_loss(student_hidden, teacher_hidden, student_head, teacher_head, temperature, chunk)
        torch.testing.assert_close(value, full, rtol=1e-12, atol=1e-14)
        chunk_grads = torch.autograd.grad(value, (student_hidden, student_head.weight))
        for got, want in zip(chunk_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
        assert teacher_head.weight.grad is None


def frozen_heads_with_call_log(batch: int, length: int, vocab: int):
    """A frozen float64 student head (with bias), a teacher head, random hidden states of both, and the list every
    call of either head appends the head to."""
    student_head = nn.Linear(6, vocab, bias=True).double().requires_grad_(False)
    teacher_head = nn.Linear(5, vocab, bias=False).double()
    calls = []
    for head in (student_head, teacher_head):
        head.register_forward_hook(lambda module, args, out: calls.append(module))
    student_hidden = torch.randn(batch, length, 6, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, 5, dtype=torch.float64)
    return student_head, teacher_head, student_hidden, teacher_hidden, calls


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_frozen_head_kl_equals_full_kl_and_recomputes_no_logits(temperature):
    torch.manual_seed(2)
    batch, length, vocab = 2, 10, 11
    student_head, teacher_head, student_hidden, teacher_hidden, calls = frozen_heads_with_call_log(batch, length, vocab)

    log_s = F.log_softmax(student_head(student_hidden) / temperature, -1)
    log_t = F.log_softmax(teacher_head(teacher_hidden) / temperature, -1)
    full = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2
    (want,) = torch.autograd.grad(full, student_hidden)
    for chunk in (1, 3, 10, 64):
        calls.clear()
        value = chunked_kl_loss(student_hidden, teacher_hidden, student_head, teacher_head, temperature, chunk)
        # the frozen student head is applied by weight, not called: only the teacher's head shows up, once a chunk
        assert calls == [teacher_head] * -(-length // chunk)
        torch.testing.assert_close(value, full, rtol=1e-12, atol=1e-14)
        (got,) = torch.autograd.grad(value * 3.0, student_hidden)
        torch.testing.assert_close(got, 3.0 * want, rtol=1e-10, atol=1e-13)
        assert len(calls) == -(-length // chunk)  # the backward pass computed no logits
    with pytest.raises(ValueError, match="frozen"):
        frozen_head_kl_sum(student_hidden, teacher_hidden, teacher_head, teacher_head)


def test_frozen_head_kl_matches_checkpointed_path_under_bfloat16_autocast():
    torch.manual_seed(3)
    student_head, teacher_head = nn.Linear(16, 50, bias=False), nn.Linear(16, 50, bias=False)
    student_hidden = torch.randn(2, 24, 16, requires_grad=True)
    teacher_hidden = torch.randn(2, 24, 16)
    results = []
    for frozen in (True, False):
        student_head.requires_grad_(not frozen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = chunked_kl_loss(student_hidden, teacher_hidden, student_head, teacher_head, 1.0, 8)
        (grad,) = torch.autograd.grad(value, student_hidden)
        results.append((value.detach(), grad))
    (fast_value, fast_grad), (slow_value, slow_grad) = results
    assert fast_value.dtype == torch.float32 and fast_grad.dtype == torch.float32
    torch.testing.assert_close(fast_value, slow_value, rtol=1e-5, atol=1e-6)  # same bfloat16 logits, same sum
    torch.testing.assert_close(fast_grad, slow_grad, rtol=2e-2, atol=2e-4)  # both through a bfloat16 matmul


def test_chunked_lm_loss_equals_cross_entropy():
    torch.manual_seed(1)
    head = nn.Linear(6, 13, bias=False).double()
    hidden = torch.randn(3, 9, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (3, 9))
    labels[0, 4] = labels[2, 8] = -100
    logits = head(hidden)
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1))
    grads = torch.autograd.grad(full, (hidden, head.weight))
    for chunk in (1, 3, 8, 100):
        value = chunked_lm_loss(hidden, head, labels, chunk)
        torch.testing.assert_close(value, full, rtol=1e-12, atol=1e-14)
        for got, want in zip(torch.autograd.grad(value, (hidden, head.weight)), grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_frozen_head_kl_lm_equals_the_sum_of_full_losses_in_one_pass(temperature):
    torch.manual_seed(4)
    batch, length, vocab, lm_weight = 3, 9, 13, 0.5
    student_head, teacher_head, student_hidden, teacher_hidden, calls = frozen_heads_with_call_log(batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, 4] = labels[2, 8] = labels[1, 0] = -100  # ignored targets (the first position is never one)

    logits = student_head(student_hidden)
    log_s = F.log_softmax(logits / temperature, -1)
    log_t = F.log_softmax(teacher_head(teacher_hidden) / temperature, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    (want_ce,) = torch.autograd.grad(ce, student_hidden, retain_graph=True)
    (want,) = torch.autograd.grad(kl + lm_weight * ce, student_hidden)
    for chunk in (1, 4, 9, 64):
        calls.clear()
        value = kl_lm_loss(student_hidden, teacher_hidden, student_head, teacher_head, labels, temperature,
                           lm_weight, chunk)
        assert calls == [teacher_head] * -(-length // chunk)  # the student's logits once, by weight, a chunk at a time
        torch.testing.assert_close(value, kl + lm_weight * ce, rtol=1e-12, atol=1e-14)
        (got,) = torch.autograd.grad(value * 2.0, student_hidden)
        torch.testing.assert_close(got, 2.0 * want, rtol=1e-10, atol=1e-13)
        assert len(calls) == -(-length // chunk)  # the backward pass computed no logits

        # The LM loss alone takes the same one-pass path.
        value = chunked_lm_loss(student_hidden, student_head, labels, chunk)
        torch.testing.assert_close(value, ce, rtol=1e-12, atol=1e-14)
        (got,) = torch.autograd.grad(value, student_hidden)
        torch.testing.assert_close(got, want_ce, rtol=1e-10, atol=1e-13)
        assert len(calls) == -(-length // chunk)


def test_frozen_head_kl_lm_matches_checkpointed_path_under_bfloat16_autocast():
    torch.manual_seed(5)
    student_head, teacher_head = nn.Linear(16, 50, bias=False), nn.Linear(16, 50, bias=False)
    student_hidden = torch.randn(2, 24, 16, requires_grad=True)
    teacher_hidden = torch.randn(2, 24, 16)
    labels = torch.randint(0, 50, (2, 24))
    results = []
    for frozen in (True, False):
        student_head.requires_grad_(not frozen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = kl_lm_loss(student_hidden, teacher_hidden, student_head, teacher_head, labels, 1.0, 1.0, 8)
        (grad,) = torch.autograd.grad(value, student_hidden)
        results.append((value.detach(), grad))
    (fast_value, fast_grad), (slow_value, slow_grad) = results
    assert fast_value.dtype == torch.float32 and fast_grad.dtype == torch.float32
    torch.testing.assert_close(fast_value, slow_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=2e-2, atol=2e-4)


# --- (6) bad input ------------------------------------------------------------------------------------------------


def _one_line_error(match: str, call) -> None:
    with pytest.raises(HFCompressError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_inputs_fail_with_one_line(tiny_shared_basis_checkpoint, tiny_source_dir, calib_file, tmp_path):
    before = folder_hashes(tiny_shared_basis_checkpoint)
    out = tmp_path / "healed"
    good = small_config(calib_file)
    run = lambda student=tiny_shared_basis_checkpoint, teacher=str(tiny_source_dir), config=good, output=out, **kw: (
        heal(student, output, teacher=teacher, config=config, device="cpu", progress=False, **kw))

    _one_line_error(r"not a SharedBasisLlama.*hf-compress convert.*nothing to heal", lambda: run(student=tiny_source_dir))
    _one_line_error(r"not a SharedBasisLlama", lambda: run(student=AutoModelForCausalLM.from_pretrained(tiny_source_dir)))
    _one_line_error(r"vocabulary has 260 tokens and the student's 257",
                    lambda: run(teacher=tiny_llama(vocab_size=make_tokenizer().__len__() + 3)))
    # Same vocabulary size, but a tokenizer that lowercases: it cuts the sample text differently.
    from tokenizers import normalizers

    other = tmp_path / "lowercase-teacher"
    AutoModelForCausalLM.from_pretrained(tiny_source_dir).save_pretrained(other)
    lowercase = make_tokenizer()
    lowercase.backend_tokenizer.normalizer = normalizers.Lowercase()
    lowercase.save_pretrained(other)
    _one_line_error(r"tokenizer cuts text differently", lambda: run(teacher=str(other)))
    for field, value, flag in (("tokens", 0, "--tokens"), ("seq_len", 1, "--seq-len"), ("batch_size", 0, "--batch-size"),
                               ("lr", 0.0, "--lr"), ("loss", "mse", "--loss"), ("trainable", "everything", "--trainable"),
                               ("schedule", "linear", "--schedule"), ("temperature", 0.0, "--temperature"),
                               ("hidden_weight", -0.5, "--hidden-weight")):
        bad = small_config(calib_file, **{field: value})
        _one_line_error(flag, lambda config=bad: run(config=config))
    shallow = tiny_llama(vocab_size=len(make_tokenizer()), num_hidden_layers=3)
    _one_line_error(r"--hidden-weight compares the decoder layers.*teacher has 3 layers of width 32, the student 4",
                    lambda: run(teacher=shallow, config=small_config(calib_file, hidden_weight=1.0)))
    run(teacher=shallow, config=small_config(calib_file, tokens=4 * 32, loss="lm"), output=tmp_path / "lm-only")
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("Too short.\n")
    _one_line_error(r"tiny.txt.*fewer than one batch of 4 x 32", lambda: run(config=small_config(tiny_text)))
    (tmp_path / "exists").mkdir()
    heal_output = tmp_path / "earlier"
    heal_output.mkdir()
    (heal_output / "config.json").write_text(json.dumps({"model_type": "shared_basis_llama"}))
    _one_line_error(r"already exists \(pass --overwrite", lambda: run(output=heal_output))
    _one_line_error(r"refusing to write .*overlaps the source", lambda: run(output=tiny_shared_basis_checkpoint,
                                                                           overwrite=True))
    _one_line_error(r"refusing to write .*overlaps the source", lambda: run(output=tiny_source_dir / "healed"))

    assert folder_hashes(tiny_shared_basis_checkpoint) == before
    assert not out.exists() and not state_dir_for(out).exists()


def test_config_round_trip_and_resolve():
    config = HealConfig(loss="kl+lm", trainable="lora", dataset_column="text")
    assert HealConfig.from_dict(config.to_dict()) == config
    resolved = config.resolve("cpu")
    assert resolved.dtype in ("float32", "bfloat16") and config.dtype == "auto"
    config.validate()


# --- (7) LoRA -----------------------------------------------------------------------------------------------------


def test_lora_heals_into_a_plain_shared_basis_checkpoint(tiny_shared_basis_checkpoint, tiny_source_dir, calib_file,
                                                         tmp_path):
    out = tmp_path / "healed-lora"
    result = heal(tiny_shared_basis_checkpoint, out, teacher=str(tiny_source_dir),
                  config=small_config(calib_file, trainable="lora", lora_rank=4, lr=2e-3, tokens=6 * 4 * 32,
                                      loss="lm", dtype="bfloat16"),
                  device="cpu", progress=False)
    before, after = safetensors_of(tiny_shared_basis_checkpoint), safetensors_of(out)
    assert before.keys() == after.keys() and not any("lora" in k for k in after)
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert any("shared_bases" in k for k in changed) and any("norm" in k for k in changed)
    assert not any("coefficients" in k or "embed_tokens" in k for k in changed)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "shared_basis_llama" and "peft" not in json.dumps(config).lower()
    assert config["compression"]["healing"]["options"]["trainable"] == "lora"
    model = load_student(out)  # the strict loader: no weight missing
    assert all(m.basis is model.model.shared_bases["q_proj"][0] for m in _members(model, "q_proj", 0))
    assert 0 < result.trainable_params < sum(p.numel() for p in model.parameters()) / 4
    assert all(after[k].dtype == torch.float32 for k in after)

    # Interrupted, a student given in memory is left without adapters, its bases linked as before.
    student = load_student(tiny_shared_basis_checkpoint)
    keys = student.state_dict().keys()
    with pytest.raises(KeyboardInterrupt):
        heal(student, tmp_path / "interrupted", teacher=str(tiny_source_dir), on_step=Interrupt(at=1), device="cpu",
             config=small_config(calib_file, trainable="lora", lora_rank=4), progress=False)
    assert student.state_dict().keys() == keys
    assert all(m.basis is student.model.shared_bases["up_proj"][1] for m in _members(student, "up_proj", 1))

    # Without an output (what `convert` does before it saves): healed in place, merged, carrying the record.
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    unsaved = heal(student, None, teacher=str(tiny_source_dir), device="cpu", progress=False,
                   config=small_config(calib_file, trainable="lora", lora_rank=4, lr=2e-3, tokens=3 * 4 * 32))
    assert unsaved.output_dir is None and not list(tmp_path.glob("*heal-state*"))
    assert student.state_dict().keys() == keys and type(student) is SharedBasisLlamaForCausalLM
    assert not torch.equal(student.model.shared_bases["q_proj"][0].weight, initial["model.shared_bases.q_proj.0.weight"])
    assert student.config.compression["healing"]["steps"] == 3
    assert student.config.compression["method"] == "basis_sharing"


# --- the command line ---------------------------------------------------------------------------------------------


def test_cli_heal(tiny_shared_basis_checkpoint, tiny_source_dir, calib_file, tmp_path):
    import typer
    from typer.testing import CliRunner

    from hf_compress.cli.heal import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps "heal" a subcommand
    runner = CliRunner()
    assert str(HealConfig().tokens) in runner.invoke(app, ["heal", "--help"], terminal_width=200).output
    args = ["heal", str(tiny_shared_basis_checkpoint), str(tmp_path / "healed"), "--teacher", str(tiny_source_dir),
            "--dataset", str(calib_file), "--tokens", "256", "--seq-len", "32", "--batch-size", "4", "--device", "cpu",
            "--no-progress", "--dtype", "float32"]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "saved" in ok.output and "tokens/s" in ok.output and "->" in ok.output
    bad = runner.invoke(app, args + ["--loss", "mse", "--overwrite"])
    assert isinstance(bad.exception, HFCompressError) and "--loss" in str(bad.exception)


# --- healing inside `convert`, and the perplexity before and after ------------------------------------------------


def _perplexity_of(folder: Path, text_file: Path, tokenizer) -> float:
    from hf_compress.evaluation.perplexity import perplexity

    return perplexity(load_student(folder), tokenizer, text_file.read_text().splitlines(), seq_len=16, progress=False)


def test_convert_with_heal_equals_convert_then_heal(tiny_source_dir, calib_file, tmp_path):
    """`convert(heal=...)` heals the model in memory from the source in memory: the same weights as converting, saving
    and healing the saved checkpoint; the perplexities before and after healing are those of independent measures."""
    from hf_compress.basis_sharing import BasisSharingConfig, CalibrationConfig, convert

    held_out = tmp_path / "held_out.txt"
    held_out.write_text(HELD_OUT)
    tokenizer = AutoTokenizer.from_pretrained(tiny_source_dir)
    options = {"calibration": CalibrationConfig(dataset=str(calib_file), samples=8, seq_len=32), "progress": False,
               "eval_dataset": str(held_out), "eval_seq_len": 16}
    plain = convert(str(tiny_source_dir), tmp_path / "plain", BasisSharingConfig(ratio=0.3), **options)
    separate = heal(tmp_path / "plain", tmp_path / "separate", teacher=str(tiny_source_dir),
                    config=small_config(calib_file), progress=False, eval_dataset=str(held_out), eval_seq_len=16)
    joint = convert(str(tiny_source_dir), tmp_path / "joint", BasisSharingConfig(ratio=0.3),
                    heal=small_config(calib_file), **options)

    assert joint.healing.steps == 16 and joint.provenance["healing"]["tokens"] == 16 * 4 * 32
    assert joint.timings["healing_s"] > 0
    joint_weights, separate_weights = safetensors_of(tmp_path / "joint"), safetensors_of(tmp_path / "separate")
    assert joint_weights.keys() == separate_weights.keys()
    for name, tensor in joint_weights.items():
        torch.testing.assert_close(tensor, separate_weights[name], rtol=0, atol=1e-6, msg=name)
    # Before healing: the plain conversion's perplexity; after: the saved healed checkpoint's.
    healed_ppl = _perplexity_of(tmp_path / "joint", held_out, tokenizer)
    assert joint.perplexity_unhealed == pytest.approx(plain.perplexity_after, rel=1e-6)
    assert joint.perplexity_after == pytest.approx(healed_ppl, rel=1e-5)
    assert joint.perplexity_before == pytest.approx(plain.perplexity_before, rel=1e-9)  # the source, unchanged
    record = json.loads((tmp_path / "joint" / "config.json").read_text())["compression"]["healing"]["perplexity"]
    assert record["before"] == pytest.approx(plain.perplexity_after, rel=1e-4)
    assert record["after"] == pytest.approx(healed_ppl, rel=1e-4) and record["dataset"] == "held_out.txt"
    saved = json.loads((tmp_path / "joint" / "perplexity.json").read_text())
    assert saved["perplexity_before_healing"] == pytest.approx(plain.perplexity_after, rel=1e-6)
    # The standalone heal measured the same two perplexities on the same text.
    separate_record = separate.provenance["healing"]["perplexity"]
    assert separate_record["before"] == pytest.approx(plain.perplexity_after, rel=1e-4)
    assert separate_record["after"] == pytest.approx(_perplexity_of(tmp_path / "separate", held_out, tokenizer), rel=1e-4)
    card = (tmp_path / "joint" / "README.md").read_text()
    assert f"{16 * 4 * 32:,} tokens in 16 steps" in card
    assert f"| {record['before']:.4g} / {record['after']:.4g} |" in card


def test_cli_convert_heal_tokens(tiny_source_dir, calib_file, tmp_path):
    import typer
    from typer.testing import CliRunner

    from hf_compress.cli.llm import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    short = tmp_path / "short.txt"
    short.write_text(HELD_OUT)
    base = ["convert", str(tiny_source_dir), str(tmp_path / "out"), "--calib-dataset", str(calib_file),
            "--calib-samples", "8", "--calib-seq-len", "32", "--heal-dataset", str(short), "--device", "cpu"]
    bad = runner.invoke(app, base + ["--heal-tokens", "-1"])
    assert isinstance(bad.exception, HFCompressError) and "--heal-tokens" in str(bad.exception)
    assert not (tmp_path / "out").exists()
    # One healing step of the default 2 x 512 tokens does not fit a short text: refused before the calibration.
    too_small = runner.invoke(app, base + ["--heal-tokens", "100"])
    assert isinstance(too_small.exception, HFCompressError) and "fewer than one batch" in str(too_small.exception)
    assert not (tmp_path / "out").exists()


# --- (8) the decoder layers' outputs matched to the teacher's ----------------------------------------------------


def relative_layer_distance(student_states, teacher_states) -> float:
    """Mean over layers and positions of |s - t|^2 / |t|^2, one position at a time in float64."""
    per_layer = []
    for s, t in zip(student_states, teacher_states):
        s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
        per_layer.append(sum(float((s[i] - t[i]).norm() ** 2 / t[i].norm() ** 2) for i in range(len(t))) / len(t))
    return sum(per_layer) / len(per_layer)


def decoder_layer_outputs(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output through transformers' own `output_hidden_states` (whose last entry is the final
    norm's output: the norm is taken out of a copy to get the last layer's)."""
    import copy

    model = copy.deepcopy(model)
    model.model.norm = nn.Identity()
    with torch.no_grad():
        states = model.model(input_ids=ids, output_hidden_states=True).hidden_states
    return list(states[1:])


def test_hidden_state_loss_is_the_relative_distance_per_position():
    torch.manual_seed(6)
    student = [torch.randn(2, 5, 8) for _ in range(3)]
    teacher = [torch.randn(2, 5, 8) for _ in range(3)]
    want = relative_layer_distance(student, teacher)
    assert float(hidden_state_loss(student, teacher)) == pytest.approx(want, rel=1e-6)
    # A position a thousand times larger (an attention sink) weighs as much as any other.
    for s, t in zip(student, teacher):
        s[0, 0] *= 1000.0
        t[0, 0] *= 1000.0
    assert float(hidden_state_loss(student, teacher)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="one teacher state per student state"):
        hidden_state_loss(student, teacher[:2])


def test_objective_adds_the_layer_distance_and_checkpointing_keeps_its_gradient(tiny_shared_basis_checkpoint,
                                                                                 tiny_source_dir, calib_file):
    student, teacher = load_student(tiny_shared_basis_checkpoint), AutoModelForCausalLM.from_pretrained(tiny_source_dir)
    mark_trainable(student)
    torch.manual_seed(0)
    ids = torch.randint(0, student.config.vocab_size, (2, 24))
    final, layers = teacher_states(teacher, ids, layers=True)
    assert torch.equal(final, teacher_states(teacher, ids)[0])
    want_layers = decoder_layer_outputs(teacher, ids)
    assert len(layers) == len(want_layers) == 4
    assert all(torch.equal(got, want) for got, want in zip(layers, want_layers))

    plain = HealingObjective(student, teacher.get_output_embeddings(), small_config(calib_file, loss="kl+lm"))
    weighted = HealingObjective(student, teacher.get_output_embeddings(),
                                small_config(calib_file, loss="kl+lm", hidden_weight=0.5))
    distance = relative_layer_distance(decoder_layer_outputs(student, ids), want_layers)
    assert distance > 1e-3
    with torch.no_grad():
        gap = float(weighted(ids, final, layers) - plain(ids, final, layers))
    assert gap == pytest.approx(0.5 * distance, rel=1e-4)  # float32 losses of about 5, subtracted
    with pytest.raises(ValueError, match="teacher's layer outputs"):
        weighted(ids, final)

    student.train()
    grads = []
    for checkpointing in (False, True):
        _set_checkpointing(student, checkpointing)
        student.zero_grad(set_to_none=True)
        weighted(ids, final, layers).backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad})
    _set_checkpointing(student, False)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    # The first layer's coefficients get a gradient from the layer term alone (with the LM loss off and no KL).
    student.zero_grad(set_to_none=True)
    only_layers = HealingObjective(student, teacher.get_output_embeddings(),
                                   small_config(calib_file, loss="kl+lm", hidden_weight=1.0))
    (only_layers(ids, final, layers) - plain(ids, final, layers)).backward()
    assert student.model.layers[0].mlp.down_proj.coefficients.grad.abs().sum() > 0


def test_heal_trains_on_the_layer_term_and_records_it(tiny_shared_basis_checkpoint, tiny_source_dir, calib_file,
                                                       tmp_path):
    from hf_compress.healing.data import load_healing_data

    losses = {}
    for weight in (0.0, 2.0):
        out = tmp_path / f"healed-layers-{weight:g}"
        config = small_config(calib_file, hidden_weight=weight, tokens=3 * 4 * 32, lr=1e-4)
        losses[weight] = heal(tiny_shared_basis_checkpoint, out, teacher=str(tiny_source_dir), config=config,
                              device="cpu", progress=False).losses
    # The first step's loss is the unhealed student's: with the layer term it exceeds the KL alone by the weight
    # times the layer distance on the first batch, computed here from transformers' own hidden states.
    teacher = AutoModelForCausalLM.from_pretrained(tiny_source_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_source_dir)
    data, _ = load_healing_data(tokenizer, small_config(calib_file).resolve("cpu", chat_template=False), teacher,
                                device=torch.device("cpu"), progress=False)
    ids = data.batch(0, 0, 1)
    distance = relative_layer_distance(decoder_layer_outputs(load_student(tiny_shared_basis_checkpoint), ids),
                                       decoder_layer_outputs(teacher, ids))
    assert distance > 1e-3
    assert losses[2.0][0] - losses[0.0][0] == pytest.approx(2.0 * distance, rel=1e-3)
    assert losses[2.0][1:] != losses[0.0][1:]  # and it changes what trains
    options = json.loads((out / "config.json").read_text())["compression"]["healing"]["options"]
    assert options["hidden_weight"] == 2.0 and options["loss"] == "kl"
    # A record written before the option existed reads back as healed without it.
    assert HealConfig.from_dict({k: v for k, v in options.items() if k != "hidden_weight"}).hidden_weight == 0.0


# --- (9) balanced factors -----------------------------------------------------------------------------------------


def _factor_groups(student) -> list[tuple[nn.Linear, list[nn.Module]]]:
    """Every basis with the projections that use it, from the config's groups."""
    return [(student.model.shared_bases[name][g], _members(student, name, g))
            for name, groups in student.config.basis_groups.items() for g in range(len(groups))]


def test_balance_factors_keeps_the_function_and_equalises_each_component(tiny_shared_basis_checkpoint):
    student = load_student(tiny_shared_basis_checkpoint)
    groups = _factor_groups(student)
    products = [[m.dense_weight().double() for m in members] for _, members in groups]
    torch.manual_seed(0)
    ids = torch.randint(0, student.config.vocab_size, (2, 20))
    with torch.no_grad():
        logits = student(ids).logits
    # No basis row is zero: every component is rescaled (none is left as it is).
    assert all(float(basis.weight.detach().norm(dim=1).min()) > 0 for basis, _ in groups)

    assert balance_factors(student) == len(groups) == sum(len(g) for g in student.config.basis_groups.values())
    for (basis, members), before in zip(groups, products):
        rows = basis.weight.double().norm(dim=1)
        columns = torch.cat([m.coefficients.double() for m in members]).norm(dim=0)
        torch.testing.assert_close(rows, columns, rtol=1e-5, atol=0)
        for member, product in zip(members, before):
            assert member.basis is basis  # still one tensor for the group
            torch.testing.assert_close(member.dense_weight().double(), product, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, logits, rtol=1e-4, atol=1e-4)
    # Balanced twice: nothing moves (every scale is 1).
    state = {k: v.clone() for k, v in student.state_dict().items()}
    balance_factors(student)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=1e-6, atol=0)


def _relative_moves(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean relative change `|end - start| / |start|` of the bases and of the coefficients."""
    def mean_move(keys: list[str]) -> float:
        return sum(float((end[k].double() - start[k].double()).norm() / start[k].double().norm()) for k in keys) / len(keys)

    return (mean_move([k for k in start if k.startswith("model.shared_bases.")]),
            mean_move([k for k in start if k.endswith(".coefficients")]))


def lopsided_student(checkpoint: Path, factor: float = 10.0) -> SharedBasisLlamaForCausalLM:
    """The tiny student with its bases `factor` times larger and its coefficients as much smaller (the same model),
    as the conversion leaves a real model's factors (the basis entries several times the others)."""
    student = load_student(checkpoint)
    with torch.no_grad():
        for basis, members in _factor_groups(student):
            basis.weight.mul_(factor)
            for member in members:
                member.coefficients.div_(factor)
    return student


def test_heal_with_balanced_factors_starts_from_the_same_loss_and_moves_the_bases(
        tiny_shared_basis_checkpoint, tiny_source_dir, calib_file, tmp_path):
    run = {"teacher": str(tiny_source_dir), "device": "cpu", "progress": False}
    moves = {}
    for balance in (False, True):
        student = lopsided_student(tiny_shared_basis_checkpoint)
        if balance:
            balance_factors(student)  # what the run starts from (heal balances again: every scale is then 1)
        start = {k: v.clone() for k, v in student.state_dict().items()}
        result = heal(student, None, tokenizer=AutoTokenizer.from_pretrained(
            tiny_source_dir), config=small_config(calib_file, tokens=4 * 4 * 32, balance_factors=balance), **run)
        moves[balance] = (result.losses[0], *_relative_moves(start, student.state_dict()))
        if balance:
            assert student.config.compression["healing"]["options"]["balance_factors"] is True
    # The first loss is taken before any update: the balanced student is the same function.
    assert moves[True][0] == pytest.approx(moves[False][0], rel=1e-3)
    # AdamW moves every entry by about the learning rate: lopsided (ten times larger against ten times smaller),
    # the basis entries change about a hundred times less, relative to their size, than the coefficients;
    # balanced, the two change alike.
    (_, plain_bases, plain_coefficients), (_, balanced_bases, balanced_coefficients) = moves[False], moves[True]
    assert plain_bases < 0.05 * plain_coefficients
    assert 0.5 < balanced_bases / balanced_coefficients < 2.0
    assert HealConfig.from_dict({"tokens": 8}).balance_factors is False  # older records: not balanced
