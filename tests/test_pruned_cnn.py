"""PrunedCNN family: layout, counts, ResNet conversion, save / load / remote code, pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import randomize_bn
import transformers
from PIL import Image

from hf_compress.errors import HFCompressError
from hf_compress.modeling.pruned_cnn import PrunedCNNConfig, PrunedCNNForImageClassification, resnet_cifar_config, vgg_cifar_config
from hf_compress.vision.checkpoint import save_checkpoint
from hf_compress.vision.counting import count_params_and_macs
from hf_compress.vision.resnet_import import load_cnn, resnet_to_pruned_cnn

torch.set_num_threads(2)




def tiny_resnet_config(**kwargs) -> PrunedCNNConfig:
    return PrunedCNNConfig(
        stem_width=4, hidden_sizes=[4, 8], stage_strides=[1, 2], block_widths=[[[3], [2]], [[5]]], num_labels=3, image_size=8, **kwargs
    )


@pytest.mark.parametrize(
    "resnet_kwargs",
    [
        dict(layer_type="basic", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2]),
        dict(layer_type="bottleneck", embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1], downsample_in_bottleneck=True),
        dict(layer_type="bottleneck", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], downsample_in_first_stage=True),
    ],
)
def test_resnet_conversion_gives_identical_logits(resnet_kwargs):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_labels=5, **resnet_kwargs)
    resnet = transformers.ResNetForImageClassification(config).eval()
    randomize_bn(resnet)
    converted = resnet_to_pruned_cnn(resnet)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = resnet(pixel_values=x).logits
        got = converted(pixel_values=x).logits
    assert torch.equal(got, expected)
    assert converted.num_parameters() == resnet.num_parameters() == converted.config.num_parameters
    assert converted.config.id2label == resnet.config.id2label


def test_counts_match_a_hand_count_and_the_literature():
    # stem 3->4 (3x3, 8x8); stage0: block [3] (4->3->4), block [2] (4->2->4); stage1: block [5] stride 2 (4->5->8,
    # option A pads 4 channels, no params); fc 8->3.
    config = tiny_resnet_config()
    macs = 4 * 64 * 27 + (3 * 64 * 36 + 4 * 64 * 27) + (2 * 64 * 36 + 4 * 64 * 18) + (5 * 16 * 36 + 8 * 16 * 45) + 8 * 3
    params = (4 * 27 + 8) + (3 * 36 + 6 + 4 * 27 + 8) + (2 * 36 + 4 + 4 * 18 + 8) + (5 * 36 + 10 + 8 * 45 + 16) + (8 * 3 + 3)
    model = PrunedCNNForImageClassification(config)
    hooks = count_params_and_macs(model, (3, 8, 8))
    assert (config.num_parameters, config.num_macs) == (params, macs) == (hooks.params, hooks.macs)
    # The CIFAR networks of the HRank / CHIP tables: ResNet-56 0.85M / 125.49M, VGG-16 14.98M params.
    resnet56 = resnet_cifar_config(56, num_labels=10)
    assert (resnet56.num_parameters, resnet56.num_macs) == (853_018, 125_485_696)
    vgg16 = vgg_cifar_config(num_labels=10)
    assert vgg16.num_parameters == 14_987_722 and round(vgg16.num_macs / 1e6, 2) == 313.46
    for cfg in (vgg16, PrunedCNNConfig(layer_type="bottleneck", stem_width=8, hidden_sizes=[16, 32], stage_strides=[1, 2],
                                       block_widths=[[[4, 3], [0, 0]], [[8, 6]]], shortcut_type="projection", num_labels=4)):
        counts = count_params_and_macs(PrunedCNNForImageClassification(cfg))
        assert (counts.params, counts.macs) == (cfg.num_parameters, cfg.num_macs)


def test_zero_width_block_is_its_shortcut():
    model = PrunedCNNForImageClassification(PrunedCNNConfig(
        stem_width=4, hidden_sizes=[4, 8], stage_strides=[1, 2], block_widths=[[[0]], [[0]]], num_labels=3, image_size=8
    )).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        stem = model.cnn.stem(x)
        padded = torch.nn.functional.pad(stem[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        expected = model.classifier(padded.mean((2, 3)))
        assert torch.allclose(model(pixel_values=x).logits, expected, atol=1e-6)
    assert model.config.num_macs == 4 * 64 * 27 + 8 * 3


def test_bad_configs_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="plain_layers widths must be positive"):
        vgg_cifar_config(layers=[8, 0, "M", 4])
    with pytest.raises(ValueError, match="every inner width of that block must be 0"):
        PrunedCNNConfig(layer_type="bottleneck", hidden_sizes=[8], stage_strides=[1], block_widths=[[[2, 0]]])
    with pytest.raises(ValueError, match="zero_pad shortcuts need non-decreasing widths"):
        PrunedCNNConfig(stem_width=16, hidden_sizes=[8], stage_strides=[1], block_widths=[[[4]]])
    with pytest.raises(ValueError, match="same non-zero number of stages"):
        PrunedCNNConfig(hidden_sizes=[8, 16], stage_strides=[1], block_widths=[[[4]]])
    with pytest.raises(ValueError, match="architecture"):
        PrunedCNNConfig(architecture="densenet")


def test_unsupported_model_is_named(tmp_path):
    transformers.ConvNextConfig(num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(HFCompressError, match="is a 'convnext' model"):
        load_cnn(str(tmp_path))
    with pytest.raises(HFCompressError, match="does not exist"):
        load_cnn(str(tmp_path / "missing"))


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hf_compress"] = None  # the plugin must not be needed
    import torch, transformers
    results = {}
    for path in sys.argv[2:]:
        model = transformers.AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
        base = transformers.AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        x = torch.load(path + "/x.pt")
        with torch.no_grad():
            results[path] = {"logits": model(pixel_values=x).logits, "pooled": base(pixel_values=x).pooler_output,
                             "class": type(model).__module__ + "." + type(model).__name__}
    torch.save(results, sys.argv[1])
    """
)


def test_save_load_and_remote_code_round_trip(tmp_path):
    torch.manual_seed(0)
    configs = {"resnet": tiny_resnet_config(), "plain": vgg_cifar_config([4, "M", 6, 5], (7,), num_labels=3, image_size=8)}
    x = torch.randn(2, 3, 8, 8)
    models = {}
    for name, config in configs.items():
        model = PrunedCNNForImageClassification(config).eval()
        randomize_bn(model)
        model.config.id2label = {0: "cat", 1: "dog", 2: "ship"}
        model.config.label2id = {"cat": 0, "dog": 1, "ship": 2}
        save_checkpoint(model, tmp_path / name)
        torch.save(x, tmp_path / name / "x.pt")
        models[name] = model
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["auto_map"] == {
            "AutoConfig": "configuration_pruned_cnn.PrunedCNNConfig",
            "AutoModel": "modeling_pruned_cnn.PrunedCNNModel",
            "AutoModelForImageClassification": "modeling_pruned_cnn.PrunedCNNForImageClassification",
        }
        assert (tmp_path / name / "model.safetensors").exists()
        # With the plugin installed: stock Auto class, no remote code.
        reloaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / name).eval()
        assert type(reloaded) is PrunedCNNForImageClassification
        assert reloaded.config.id2label == {0: "cat", 1: "dog", 2: "ship"}
        with torch.no_grad():
            assert torch.equal(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)
    # Without it: remote code in a fresh interpreter, outside the repository.
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "out.pt"), *(str(tmp_path / name) for name in configs)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    remote = torch.load(tmp_path / "out.pt")
    for name, model in models.items():
        got = remote[str(tmp_path / name)]
        with torch.no_grad():
            assert torch.equal(got["logits"], model(pixel_values=x).logits)
            assert torch.equal(got["pooled"], model.cnn(pixel_values=x).pooler_output)
        assert got["class"].startswith("transformers_modules.") and got["class"].endswith("PrunedCNNForImageClassification")


def test_image_classification_pipeline(tmp_path):
    torch.manual_seed(1)
    model = PrunedCNNForImageClassification(tiny_resnet_config(id2label={0: "cat", 1: "dog", 2: "ship"})).eval()
    model.config.image_size = 16
    save_checkpoint(model, tmp_path / "ckpt", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    classifier = transformers.pipeline("image-classification", model=str(tmp_path / "ckpt"))
    predictions = classifier(Image.fromarray(pixels), top_k=3)
    # Independent preprocessing: rescale, normalise with the saved mean / std, no resize (already 16x16).
    x = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    with torch.no_grad():
        probs = model(pixel_values=x[None]).logits.softmax(-1)[0]
    expected = sorted(((model.config.id2label[i], float(p)) for i, p in enumerate(probs)), key=lambda t: -t[1])
    assert [p["label"] for p in predictions] == [label for label, _ in expected]
    assert [p["score"] for p in predictions] == pytest.approx([score for _, score in expected], abs=1e-5)
