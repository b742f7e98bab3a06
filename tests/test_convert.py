"""The converter end to end on tiny models: CLI, pipeline options, provenance, bad input."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from conftest import make_tokenizer, tiny_llama
from hf_compress.basis_sharing.calibration import GRAM_KEY, LayerRunner, accumulate_gram, capture_inputs, layer_grams, record_inputs, stage_inputs, symmetrize
from hf_compress.device import calibration_dtype, native_bfloat16
from hf_compress.cli import app
from hf_compress.basis_sharing.compressor import BasisSharingCompressor, block_spans, count_compressed_params, dense_projection_params
from hf_compress.basis_sharing.config import BasisSharingConfig, CalibrationConfig, default_rank_multiple
from hf_compress.basis_sharing.api import convert
from hf_compress.basis_sharing.decomposition import calibration_loss
from hf_compress.errors import HFCompressError
from hf_compress.basis_sharing.layout import dense_weight, projection
from hf_compress.evaluation.perplexity import perplexity
from hf_compress.data.text import calibration_batch, load_texts, resolve_text_source

runner = CliRunner()


def calibration_ids(tokenizer, calib_file, samples=8, seq_len=32):
    return calibration_batch(tokenizer, load_texts(resolve_text_source(str(calib_file))), samples=samples,
                             seq_len=seq_len, seed=2023)


def test_calibration_sampling_follows_the_protocol(tokenizer, calib_file):
    texts = load_texts(resolve_text_source(str(calib_file)))
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False).input_ids
    chunks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    torch.manual_seed(2023)
    expected = chunks[torch.randperm(chunks.shape[0])[:8]]
    assert torch.equal(calibration_ids(tokenizer, calib_file), expected)
    with pytest.raises(HFCompressError, match=r"fewer than the 100000 samples"):
        calibration_ids(tokenizer, calib_file, samples=100000)


def test_rank_multiple_defaults_by_device(tokenizer, calib_file):
    assert default_rank_multiple(torch.device("cuda")) == 128
    assert default_rank_multiple(torch.device("cpu")) == 1
    model = tiny_llama(vocab_size=len(tokenizer))
    compressor = BasisSharingCompressor(model, BasisSharingConfig(), calibration_ids(tokenizer, calib_file),
                                        torch.device("cpu"), progress=False)
    assert compressor.options.rank_multiple == 1


def test_block_spans_close_over_groups():
    groups = {"q_proj": [[0, 1], [2, 3], [4]], "o_proj": [[0], [1], [2], [3], [4]]}
    assert block_spans(groups, 5) == [[0, 1], [2, 3], [4]]
    assert block_spans({"q_proj": [[0, 1, 2], [3, 4]], "up_proj": [[0, 1], [2, 3], [4]]}, 5) == [[0, 1, 2, 3, 4]]


def test_layer_grams_match_an_independent_hook(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file, samples=4)
    run = LayerRunner(model, ids.shape[1], torch.device("cpu"), batch_size=3)
    hidden = model.model.embed_tokens(ids).detach()
    grams, out = layer_grams(run, model.model.layers[0], hidden, 0, ("attn_in", "down_in"))
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True)
    torch.testing.assert_close(out, reference.hidden_states[1], atol=1e-5, rtol=1e-5)
    # attn_in is the input layernorm of the embeddings.
    normed = model.model.layers[0].input_layernorm(hidden).reshape(-1, hidden.shape[-1])
    torch.testing.assert_close(grams["attn_in"], normed.T @ normed, atol=1e-3, rtol=1e-4)
    # Without outputs the forwards end at the down projection's input: same Grams, down_proj never runs.
    calls = []
    handle = projection(model.model.layers[0], "down_proj").register_forward_hook(lambda *args: calls.append(1))
    try:
        grams_only, none = layer_grams(run, model.model.layers[0], hidden, 0, ("attn_in", "down_in"), outputs=False)
    finally:
        handle.remove()
    assert none is None and calls == []
    for key in grams:
        torch.testing.assert_close(grams_only[key], grams[key], rtol=0, atol=0)


def test_auto_calibration_dtype_follows_the_hardware(monkeypatch):
    for avx512_bf16, amx, expected in ((False, False, torch.float32), (True, False, torch.bfloat16),
                                       (False, True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert calibration_dtype("auto", torch.device("cpu")) == expected
    for supported, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert calibration_dtype("auto", torch.device("cuda")) == expected


def test_calibration_dtype_resolution():
    cpu = torch.device("cpu")
    assert calibration_dtype("auto", cpu) == (torch.bfloat16 if native_bfloat16(cpu) else torch.float32)
    assert calibration_dtype("float32", cpu) == torch.float32
    assert calibration_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(HFCompressError, match=r"--calib-dtype must be one of auto, float32, bfloat16; got 'float16'"):
        calibration_dtype("float16", cpu)


def test_bfloat16_calibration_rounds_only_the_matrix_products(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file, samples=4)
    hidden = model.model.embed_tokens(ids).detach()
    keys = ("attn_in", "down_in", "mlp_in", "o_in")
    layer = model.model.layers[1]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = LayerRunner(model, ids.shape[1], torch.device("cpu"), batch_size=3, dtype=dtype)
        with capture_inputs(layer, ("o_in",)) as captured:
            runner.forward(layer, hidden[:1])
            o_in_dtype = captured["o_in"].dtype
        runs[dtype] = (*layer_grams(runner, layer, hidden, 1, keys), o_in_dtype)
    (grams32, out32, dtype32), (grams16, out16, dtype16) = runs[torch.float32], runs[torch.bfloat16]
    assert (dtype32, dtype16) == (torch.float32, torch.bfloat16)  # autocast reached the projections
    assert out16.dtype == torch.float32  # ...but the residual stream stays float32
    # The attention input is the norm of the float32 stream: no product has run yet, so its Gram is unchanged.
    torch.testing.assert_close(grams16["attn_in"], grams32["attn_in"], rtol=0, atol=0)
    for key in ("o_in", "mlp_in", "down_in"):
        error = (grams16[key] - grams32[key]).norm() / grams32[key].norm()
        assert 0 < error < 2e-2, (key, error)  # rounded to bfloat16's 8 bits, no worse
    assert 0 < (out16 - out32).norm() / out32.norm() < 1e-2


def test_blocked_gram_equals_the_full_product():
    torch.manual_seed(0)
    chunks = [torch.randn(50, 600, dtype=torch.float64) for _ in range(3)]  # 600 spans three 256-wide blocks
    gram = None
    for x in chunks:
        gram = accumulate_gram(gram, x)
    x = torch.cat(chunks)
    torch.testing.assert_close(symmetrize(gram), x.T @ x)
    assert gram[300, 10] == 0  # below the diagonal blocks nothing was computed


def test_stage_inputs_stop_early_and_match_a_full_forward(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file, samples=5)
    run = LayerRunner(model, ids.shape[1], torch.device("cpu"), batch_size=2)
    hidden = model.model.embed_tokens(ids).detach()
    layer = model.model.layers[1]
    keys = ("attn_in", "o_in", "mlp_in", "down_in")
    inputs, out = record_inputs(run, layer, hidden, 1, keys)
    torch.testing.assert_close(out, layer_grams(run, layer, hidden, 1, ())[1])
    with torch.no_grad(), capture_inputs(layer, keys) as captured:
        layer(hidden, **run.layer_kwargs(hidden))
        reference = {key: x.clone() for key, x in captured.items()}
    calls = []
    handle = layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for key in keys:
            calls.clear()
            seen = torch.cat([x for _, x in stage_inputs(run, layer, hidden, 1, key)])
            torch.testing.assert_close(seen, reference[key], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(inputs[key], reference[key], atol=1e-5, rtol=1e-5)
            # The forward ends at the stage's projection: the MLP only runs for the MLP's own inputs.
            assert len(calls) == (3 if key in ("mlp_in", "down_in") else 0)
    finally:
        handle.remove()


def test_layer_fit_solves_each_members_least_squares(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file)

    def compressor(**options):
        return BasisSharingCompressor(model, BasisSharingConfig(ratio=0.5, sequential=False, **options), ids,
                                      torch.device("cpu"), progress=False)

    grams = compressor().dense_grams()
    assert BasisSharingConfig().layer_fit  # the default
    plain, fitted = compressor(layer_fit=False).run(dense_grams=grams), compressor().run(dense_grams=grams)
    lowered = 0
    for name in ("q_proj", "up_proj"):
        for before, after in zip(plain[name], fitted[name]):
            assert len(after.layers) == 2 and torch.equal(before.basis, after.basis)
            b = after.basis.double()
            for i, layer_idx in enumerate(after.layers):
                gram = grams[layer_idx][GRAM_KEY[name]].double()
                w = dense_weight(model.model.layers[layer_idx], name).double()
                c = after.coefficients[i].double()
                # Normal equations of min ||X W - X B C||: B^T G (W - B C) = 0.
                normal = b.T @ gram @ (w - b @ c)
                assert normal.abs().max() < 1e-4 * (b.T @ gram @ w).abs().max()
                loss_after = calibration_loss(b, c, w, gram, gram, gram)
                loss_before = calibration_loss(b, before.coefficients[i], w, gram, gram, gram)
                assert loss_after <= loss_before * (1 + 1e-9)
                lowered += loss_after < loss_before * (1 - 1e-6)
    assert lowered > 0
    torch.testing.assert_close(fitted["o_proj"][1].coefficients[0], plain["o_proj"][1].coefficients[0])  # groups of one


def test_sequential_is_the_default_and_takes_grams_from_the_compressed_stream(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file)
    compressor = BasisSharingCompressor(model, BasisSharingConfig(ratio=0.5, group_size=1), ids, torch.device("cpu"),
                                        progress=False)
    assert compressor.options.sequential and not compressor.needs_dense_grams()
    factors = compressor.run()
    assert "calibration_s" not in compressor.timings  # no pass over the dense model
    assert compressor.timings["calibration_and_decomposition_s"] > 0
    from hf_compress.basis_sharing.assembly import build_shared_basis_llama
    from hf_compress.basis_sharing.decomposition import factors_at_rank, spectrum

    compressed = build_shared_basis_llama(model, factors)
    with torch.no_grad():
        entering = compressed(ids, output_hidden_states=True).hidden_states[1]  # after compressed layer 0
        x = model.model.layers[1].input_layernorm(entering).reshape(-1, entering.shape[-1]).double()
    for name in ("q_proj", "v_proj"):
        group = factors[name][1]
        expected = factors_at_rank(spectrum(name, [1], [dense_weight(model.model.layers[1], name)], x.T @ x), group.rank)
        torch.testing.assert_close(group.basis.double() @ group.coefficients[0].double(),
                                   expected.basis @ expected.coefficients[0], atol=1e-4, rtol=1e-3)


def test_sequential_calibration_runs_no_forward_it_does_not_use(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file, samples=4)
    finished = [0] * 4  # completed forwards per layer, dense or compressed (the compressed copies keep the hooks)
    for idx, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *args, idx=idx: finished.__setitem__(idx, finished[idx] + 1))
    runner_batches = math.ceil(ids.shape[0] / 8)
    BasisSharingCompressor(model, BasisSharingConfig(ratio=0.3), ids, torch.device("cpu"), progress=False).run()
    # Blocks [0, 1] and [2, 3]. Layer 0: dense (Grams, and input of dense layer 1) + compressed (the stream).
    # Layer 1: its dense forward ends at down_proj, its compressed one carries the stream to the next block.
    # Layers 2-3: nothing reads the stream after the last block, so only layer 2's dense forward completes.
    assert finished == [2 * runner_batches, runner_batches, runner_batches, 0]
    # Plain SVD says it runs no calibration forward, and none runs.
    finished[:] = [0] * 4
    plain = BasisSharingCompressor(model, BasisSharingConfig(ratio=0.3, whiten=False), ids, torch.device("cpu"),
                                   progress=False)
    assert not plain.runs_forwards
    plain.run()
    assert finished == [0, 0, 0, 0]


def test_rank_multiples_under_sequential_calibration_need_no_dense_pass(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file)
    compressor = BasisSharingCompressor(model, BasisSharingConfig(ratio=0.4, rank_multiple=8), ids,
                                        torch.device("cpu"), progress=False)
    assert not compressor.needs_dense_grams()
    factors = compressor.run()
    assert "calibration_s" not in compressor.timings
    assert all(f.rank % 8 == 0 for groups in factors.values() for f in groups)
    before, after = dense_projection_params(model, factors), count_compressed_params(factors)
    budget = int(0.6 * before)
    assert after <= budget  # the budget is met, and no chunk of 8 ranks that would still fit is left unspent:
    cheapest = min(f.basis.shape[0] + len(f.layers) * f.coefficients[0].shape[1] for g in factors.values() for f in g)
    assert budget - after < 8 * cheapest


def test_refit_of_the_first_layer_reproduces_svd_llm(tokenizer, calib_file):
    """With groups of one, the whitened SVD's coefficients are already the least-squares optimum for their basis on
    the dense inputs; layer 0's q/k/v see exactly those inputs, so the refit must give them back."""
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file)
    options = dict(ratio=0.5, group_size=1, sequential=False)
    plain = BasisSharingCompressor(model, BasisSharingConfig(**options), ids, torch.device("cpu"), progress=False).run()
    refit = BasisSharingCompressor(model, BasisSharingConfig(**options, refit=True), ids, torch.device("cpu"),
                                   progress=False).run()
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(refit[name][0].coefficients[0], plain[name][0].coefficients[0], atol=1e-4, rtol=1e-3)
    # Later layers see the compressed model's inputs, so their coefficients move.
    assert not torch.allclose(refit["q_proj"][1].coefficients[0], plain["q_proj"][1].coefficients[0], atol=1e-3)


def loss_of(model, factors, ids, dense=None):
    """Summed whitened-space calibration loss of every compressed projection on the dense model's inputs."""
    run = LayerRunner(model, ids.shape[1], torch.device("cpu"), batch_size=8)
    hidden = model.model.embed_tokens(ids).detach()
    total = 0.0
    for layer_idx, layer in enumerate(model.model.layers):
        grams, hidden = layer_grams(run, layer, hidden, layer_idx, tuple(sorted(set(GRAM_KEY.values()))))
        for name, groups in factors.items():
            group = next(g for g in groups if layer_idx in g.layers)
            c = group.coefficients[group.layers.index(layer_idx)]
            gram = grams[GRAM_KEY[name]].double()
            total += calibration_loss(group.basis, c, dense_weight(layer, name), gram, gram, gram)
    return total


def test_whitening_beats_plain_svd_on_the_model(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file)
    whitened = BasisSharingCompressor(model, BasisSharingConfig(ratio=0.4), ids, torch.device("cpu"), progress=False).run()
    plain = BasisSharingCompressor(model, BasisSharingConfig(ratio=0.4, whiten=False), ids, torch.device("cpu"),
                                   progress=False).run()
    assert loss_of(model, whitened, ids) < loss_of(model, plain, ids)


def test_sequential_and_refit_run_and_refit_lowers_output_error(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file)
    with torch.no_grad():
        reference = model(ids).logits
    errors = {}
    for label, opts in {
        "plain": BasisSharingConfig(ratio=0.5, sequential=False),
        "refit": BasisSharingConfig(ratio=0.5, sequential=False, refit=True),
        "sequential": BasisSharingConfig(ratio=0.5, sequential=True),
    }.items():
        compressor = BasisSharingCompressor(model, opts, ids, torch.device("cpu"), progress=False)
        from hf_compress.basis_sharing.assembly import build_shared_basis_llama

        compressed = build_shared_basis_llama(model, compressor.run())
        with torch.no_grad():
            errors[label] = float(((compressed(ids).logits - reference) ** 2).mean())
    assert errors["refit"] < errors["plain"]
    assert math.isfinite(errors["sequential"])


def test_cli_convert_end_to_end(tiny_source_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "convert", str(tiny_source_dir), str(out), "--ratio", "0.3", "--calib-dataset", str(calib_file),
        "--calib-samples", "8", "--calib-seq-len", "32", "--eval-dataset", str(calib_file), "--eval-seq-len", "64",
        "--eval-max-windows", "3", "--rank-allocation", "global",
    ])
    assert result.exit_code == 0, result.output
    assert "achieved" in result.output and "perplexity" in result.output
    # Sequential by default; global allocation adds a dense pass for the spectra.
    phases = re.search(r"conversion: ([\d.]+) s \(load ([\d.]+) s, calibration ([\d.]+) s, "
                       r"calibration and decomposition ([\d.]+) s\)", result.output)
    assert phases, result.output
    total, *parts = (float(v) for v in phases.groups())
    assert sum(parts) <= total + 0.2  # the phases are inside the total (printed to 0.1 s, so a tiny run shows 0.0)
    config = json.loads((out / "config.json").read_text())
    provenance = config["compression"]
    assert provenance["method"] == "basis_sharing"
    assert provenance["target_ratio"] == 0.3
    assert abs(provenance["achieved_ratio"] - 0.3) < 0.005
    assert provenance["calibration"]["samples"] == 8 and provenance["calibration"]["seed"] == 2023
    # "auto" is recorded as what it resolved to on this machine.
    expected_dtype = "bfloat16" if native_bfloat16(torch.device("cpu")) else "float32"
    assert provenance["calibration"]["dtype"] == expected_dtype
    assert provenance["source"]["model_id"] == tiny_source_dir.name  # a folder name, never a local path
    assert provenance["options"]["rank_allocation"] == "global"
    # The achieved ratio is counted from the checkpoint's own parameters.
    model = AutoModelForCausalLM.from_pretrained(out)
    params = sum(p.numel() for n, p in model.named_parameters() if "shared_bases" in n or "coefficients" in n)
    assert params == provenance["params_after"]
    assert provenance["achieved_ratio"] == pytest.approx(1 - params / provenance["params_before"], abs=1e-6)
    # The printed perplexity is the one `perplexity()` computes on the saved checkpoint.
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = load_texts(resolve_text_source(str(calib_file)))
    ppl = perplexity(model, tokenizer, texts, seq_len=64, max_windows=3, progress=False)
    assert json.loads((out / "perplexity.json").read_text())["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert f"{ppl:.3f}" in result.output
    # ppl command agrees.
    result = runner.invoke(app, ["ppl", str(out), "--dataset", str(calib_file), "--seq-len", "64", "--max-windows", "3"])
    assert result.exit_code == 0, result.output
    assert f"{ppl:.4f}" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ratio", "1.5"], "--ratio must be in (0, 1)"),
        (["--ratio", "0"], "--ratio must be in (0, 1)"),
        (["--group-size", "0"], "--group-size must be between 1 and the number of layers (4)"),
        (["--group-size", "9"], "--group-size must be between 1 and the number of layers (4)"),
        (["--share", "q_proj,foo"], "--share names unknown projection(s) ['foo']"),
        (["--rank-allocation", "best"], "--rank-allocation must be 'uniform' or 'global'"),
        (["--calib-dtype", "float16"], "--calib-dtype must be one of auto, float32, bfloat16"),
        (["--calib-samples", "5000"], "fewer than the 5000 samples asked for"),
        (["--calib-column", "body"], "has no column 'body'"),
    ],
)
def test_cli_bad_input(tiny_source_dir, calib_file, tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(tiny_source_dir), str(out), "--calib-dataset", str(calib_file),
                                 "--calib-samples", "4", "--calib-seq-len", "32", *args])
    assert result.exit_code != 0
    assert message in str(result.exception) + result.output
    assert not out.exists()
    assert not any(p.name.startswith(".out.incomplete") for p in tmp_path.iterdir())


def test_existing_output_needs_overwrite(tiny_source_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    calib = CalibrationConfig(dataset=str(calib_file), samples=4, seq_len=32)
    convert(str(tiny_source_dir), out, calibration=calib, progress=False)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HFCompressError, match=r"already exists \(pass --overwrite"):
        convert(str(tiny_source_dir), out, calibration=calib, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(str(tiny_source_dir), out, calibration=calib, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    # A folder that is not an hf-compress output is never replaced, even with overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(HFCompressError, match="no hf-compress output"):
        convert(str(tiny_source_dir), other, calibration=calib, overwrite=True, progress=False)
    assert (other / "keep.txt").read_text() == "mine"


def test_unsupported_architecture_is_named(tmp_path, calib_file):
    tok = make_tokenizer()
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(tok))).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(HFCompressError, match=r"unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        convert(str(tmp_path / "gpt2"), tmp_path / "out",
                calibration=CalibrationConfig(dataset=str(calib_file), samples=4, seq_len=32), progress=False)


@pytest.mark.parametrize("layer_idx", [2, 3])
def test_nan_weights_are_named(tokenizer, calib_file, layer_idx):
    # Layer 3 ends its block: its sequential calibration forward stops at down_proj, so only its Grams see the NaN.
    model = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        projection(model.model.layers[layer_idx], "up_proj").weight[0, 0] = float("nan")
    ids = calibration_ids(tokenizer, calib_file, samples=4)
    with pytest.raises(HFCompressError, match=rf"NaN or inf in decoder layer {layer_idx}|decoder layer {layer_idx} has NaN"):
        BasisSharingCompressor(model, BasisSharingConfig(), ids, torch.device("cpu"), progress=False).run()
