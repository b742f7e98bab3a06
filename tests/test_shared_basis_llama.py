"""SharedBasisLlama model family: exactness at full rank, serialisation, remote code, generation, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import REPO, run_python, tiny_llama
from hf_compress.basis_sharing.assembly import build_shared_basis_llama
from hf_compress.basis_sharing.decomposition import factors_at_rank, make_groups, spectrum
from hf_compress.basis_sharing.layout import PROJECTIONS, dense_weight
from hf_compress.modeling.shared_basis_llama import SharedBasisLlamaConfig, SharedBasisLlamaForCausalLM

SHARED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def full_rank_factors(model, group_size: int = 2, dense: tuple[str, ...] = ()):
    """Plain SVD per group at full rank: an exact factorisation of every compressed projection."""
    layers = model.model.layers
    factors = {}
    for name in PROJECTIONS:
        if name in dense:
            continue
        groups = make_groups(len(layers), group_size if name in SHARED else 1)
        factors[name] = []
        for group in groups:
            spec = spectrum(name, group, [dense_weight(layers[i], name) for i in group], None)
            factors[name].append(factors_at_rank(spec, spec.max_rank))
    return factors


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA (4 heads, 2 KV heads), tied embeddings
        {"tie_word_embeddings": False},
        {"num_key_value_heads": 4},
        {"attention_bias": True},  # bias on q, k, v and o
        {"num_hidden_layers": 5},  # a remainder group of one layer
    ],
)
def test_full_rank_reproduces_dense_logits(overrides):
    source = tiny_llama(**overrides)
    model = build_shared_basis_llama(source, full_rank_factors(source))
    torch.testing.assert_close(logits(model, IDS), logits(source, IDS), atol=1e-5, rtol=1e-5)
    assert model.config.tie_word_embeddings == source.config.tie_word_embeddings
    if source.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_full_rank_reproduces_qwen2_with_qkv_bias_and_mistral():
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    qwen = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for layer in qwen.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).bias.normal_()  # random init zeroes biases: make them matter
    model = build_shared_basis_llama(qwen, full_rank_factors(qwen))
    assert model.config.qkv_bias and not model.config.attention_bias
    assert model.model.layers[0].self_attn.o_proj.bias is None
    torch.testing.assert_close(logits(model, IDS), logits(qwen, IDS), atol=1e-5, rtol=1e-5)

    mistral = MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    model = build_shared_basis_llama(mistral, full_rank_factors(mistral))
    torch.testing.assert_close(logits(model, IDS), logits(mistral, IDS), atol=1e-5, rtol=1e-5)


def test_dense_types_keep_their_weights():
    source = tiny_llama()
    model = build_shared_basis_llama(source, full_rank_factors(source, dense=("o_proj", "down_proj")))
    assert model.config.dense_projections == ["o_proj", "down_proj"]
    assert isinstance(model.model.layers[1].self_attn.o_proj, torch.nn.Linear)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, source.model.layers[1].mlp.down_proj.weight)
    torch.testing.assert_close(logits(model, IDS), logits(source, IDS), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    source = tiny_llama(tie_word_embeddings=False)
    spec = full_rank_factors(source)
    # Truncate so the checkpoint is a real compression, not only a reshuffle.
    factors = {name: [factors_at_rank(spectrum(name, g.layers, [g.basis @ c for c in g.coefficients], None), 4)
                      for g in groups] for name, groups in spec.items()}
    model = build_shared_basis_llama(source, factors)
    path = tmp_path_factory.mktemp("sbl")
    model.save_pretrained(path)
    return model, path


def test_save_load_is_bit_exact(saved_model):
    model, path = saved_model
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is SharedBasisLlamaForCausalLM
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


def test_safetensors_store_each_basis_once(saved_model):
    model, path = saved_model
    config = model.config
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        basis_keys = {k for k in keys if ".shared_bases." in k}
        expected = {f"model.shared_bases.{name}.{i}.weight" for name, groups in config.basis_groups.items()
                    for i in range(len(groups))}
        assert basis_keys == expected
        # q_proj groups of 2 over 4 layers -> 2 bases, each shared by two layers' coefficients.
        assert len([k for k in basis_keys if ".q_proj." in k]) == 2
        assert len([k for k in keys if k.endswith("q_proj.coefficients")]) == 4
        assert not any(k.endswith("q_proj.weight") and "layers" in k for k in keys)
        tensor_bytes = sum(f.get_tensor(k).numel() * 4 for k in keys)
    # No duplicated tensor: the file holds exactly the model's unique parameters (plus the header).
    unique = sum(p.numel() for p in model.parameters()) * 4
    assert tensor_bytes == unique
    assert unique < (path / "model.safetensors").stat().st_size < unique + 64 * 1024


def test_config_has_auto_map_and_remote_code_files(saved_model):
    _, path = saved_model
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "shared_basis_llama"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    for file in ("configuration_shared_basis_llama.py", "modeling_shared_basis_llama.py"):
        assert (path / file).read_text() == (REPO / "modeling" / "shared_basis_llama" / file).read_text()


def test_remote_code_loads_without_hf_compress(saved_model, tmp_path):
    model, path = saved_model
    torch.save(IDS, tmp_path / "ids.pt")
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoModel
m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    torch.save(m(ids).logits, {str(tmp_path / 'remote.pt')!r})
base = AutoModel.from_pretrained({str(path)!r}, trust_remote_code=True)
print(type(base).__name__)
"""
    out = run_python(code, cwd=tmp_path)
    assert "SharedBasisLlamaModel" in out
    assert torch.equal(torch.load(tmp_path / "remote.pt"), logits(model, IDS))


def test_bf16_and_device_map_auto(saved_model):
    model, path = saved_model
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto")
    assert loaded.model.shared_bases["q_proj"][0].weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.q_proj.coefficients.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; the logits stay close to the fp32 ones.
    torch.testing.assert_close(logits(loaded, IDS).float(), logits(model, IDS), atol=0.15, rtol=0.05)


def test_greedy_generate_with_cache_equals_no_cache(saved_model):
    model, _ = saved_model
    prompt = IDS[:1, :5]
    with_cache = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    no_cache = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, no_cache)
    # And both equal a hand-written greedy loop over full forwards.
    ids = prompt
    for _ in range(10):
        ids = torch.cat([ids, logits(model, ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(with_cache, ids)


# --- bad input -------------------------------------------------------------------------------------------------------

BASE = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2)


def config_with(groups, ranks, **extra):
    return SharedBasisLlamaConfig(basis_groups=groups, basis_ranks=ranks, **BASE, **extra)


@pytest.mark.parametrize(
    "groups,ranks,match",
    [
        ({"q_proj": [[0, 1], [1, 2, 3]]}, {"q_proj": [4, 4]}, r"overlap: layer 1"),
        ({"q_proj": [[0, 1], [3]]}, {"q_proj": [4, 4]}, r"does not cover layer\(s\) \[2\]"),
        ({"qq_proj": [[0, 1, 2, 3]]}, {"qq_proj": [4]}, r"basis_groups names unknown projection\(s\) \['qq_proj'\]"),
        ({"q_proj": [[0, 1], [2, 3]]}, {"q_proj": [0, 4]}, r"basis_ranks\['q_proj'\]\[0\] = 0 is out of range"),
        ({"q_proj": [[0, 1], [2, 3]]}, {"q_proj": [4, 17]}, r"basis_ranks\['q_proj'\]\[1\] = 17 .* allows ranks 1..16"),
        ({"q_proj": [[0, 1], [2, 7]]}, {"q_proj": [4, 4]}, r"names layer 7, but the model has 4 layers"),
        ({"q_proj": [[0, 1], [2, 3]]}, {"q_proj": [4]}, r"has 1 ranks for 2 groups"),
    ],
)
def test_bad_config_is_rejected(groups, ranks, match):
    with pytest.raises(ValueError, match=match):
        config_with(groups, ranks)


def test_bad_dense_projection_name():
    with pytest.raises(ValueError, match=r"dense_projections names unknown projection\(s\) \['attn'\]"):
        config_with({"q_proj": [[0, 1, 2, 3]]}, {"q_proj": [4]}, dense_projections=["attn"])


def test_missing_tensor_is_an_error_not_random_init(saved_model, tmp_path):
    from safetensors.torch import load_file, save_file

    model, path = saved_model
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.shared_bases.k_proj.1.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights .*model\.shared_bases\.k_proj\.1\.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_tensor_is_an_error(saved_model, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved_model
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.2.mlp.up_proj.coefficients"] = torch.zeros(48, 5)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"model\.layers\.2\.mlp\.up_proj\.coefficients"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_round_trip_through_auto_config(saved_model):
    model, path = saved_model
    config = AutoConfig.from_pretrained(path)
    assert config.basis_groups == model.config.basis_groups
    assert config.basis_ranks == model.config.basis_ranks
    assert config.dense_projections == model.config.dense_projections
