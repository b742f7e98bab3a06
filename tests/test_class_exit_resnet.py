"""ClassExitResNet family: the exclusion rule, batched early exit, MAC accounting, save/load/remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from hf_compress.modeling.class_exit_resnet import (
    ClassExitResNetConfig,
    ClassExitResNetForImageClassification,
    exclude_classes,
    joint_exit_loss,
)

torch.set_num_threads(1)


def _logit(probabilities: list[float]) -> torch.Tensor:
    p = torch.tensor(probabilities, dtype=torch.float32)
    return torch.log(p / (1 - p))


# Hand-made exit scores for 4 samples, 4 classes, 2 exits with betas 0.5 and 0.6 (see test docstrings).
EXIT0 = [[0.9, 0.2, 0.5, 0.4], [0.1, 0.95, 0.2, 0.3], [0.6, 0.5, 0.55, 0.1], [0.3, 0.3, 0.3, 0.3]]
EXIT1 = [[0.8, 0.9, 0.3, 0.1], [0.5, 0.5, 0.5, 0.5], [0.5, 0.6, 0.7, 0.9], [0.2, 0.2, 0.2, 0.99]]
FINAL = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 2.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


def test_exclude_classes_hand_computed():
    keep = torch.ones(4, 4, dtype=torch.bool)
    # exit 0, beta 0.5: thresholds 0.45, 0.475, 0.3, 0.15.
    keep0 = exclude_classes(_logit(sum(EXIT0, [])).view(4, 4), keep, 0.5)
    expected0 = [[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert keep0.tolist() == [[bool(v) for v in row] for row in expected0]
    # exit 1, beta 0.6: the max is over the remaining classes (sample 0: 0.8 of class 0, not 0.9 of the
    # excluded class 1), threshold 0.48 -> only class 0 is left; sample 2: max 0.7 -> threshold 0.42.
    keep1 = exclude_classes(_logit(sum(EXIT1, [])).view(4, 4), keep0, 0.6)
    expected1 = [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]
    assert keep1.tolist() == [[bool(v) for v in row] for row in expected1]
    # beta close to 1 keeps only the top class; a class tied with the top passes s_k > beta * m and stays.
    all_kept = torch.ones(1, 4, dtype=torch.bool)
    assert exclude_classes(torch.tensor([[0.0, 2.0, 1.9, -1.0]]), all_kept, 0.999).tolist() == [[False, True, False, False]]
    assert exclude_classes(torch.tensor([[0.0, 2.0, 2.0, -1.0]]), all_kept, 0.999).tolist() == [[False, True, True, False]]


class _Lookup(nn.Module):
    """Returns the row of a table picked by the sample id carried in pixel [0, 0, 0]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.table[hidden[:, 0, 0, 0].long()]


def test_early_exit_on_scripted_scores():
    """The whole batched path on hand-made scores: samples leave, results map back to the right rows."""
    config = ClassExitResNetConfig(
        num_labels=4, embedding_size=2, hidden_sizes=[2, 2], depths=[1, 1],
        exit_positions=["stem", "stage1"], exit_thresholds=[0.5, 0.6],
    )
    model = ClassExitResNetForImageClassification(config).eval()
    # Identity backbone so the sample id survives to every head; the heads and classifier read tables.
    for stage in model.resnet.encoder.stages:
        stage.layers[0] = nn.Identity()
    model.resnet.embedder = nn.Identity()
    model.resnet.pooler = nn.Identity()
    model.exit_heads[0] = _Lookup(_logit(sum(EXIT0, [])).view(4, 4))
    model.exit_heads[1] = _Lookup(_logit(sum(EXIT1, [])).view(4, 4))
    model.classifier = _Lookup(torch.tensor(FINAL))
    pixel_values = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    out = model(pixel_values)
    # Sample 1 stops at exit 0, samples 0 and 3 at exit 1, sample 2 reaches the final classifier, which
    # may only pick among classes 0-2 (class 3 was excluded at exit 0 although its final logit is highest).
    assert out.exit_indices.tolist() == [1, 0, 2, 1]
    assert out.logits.argmax(dim=1).tolist() == [0, 1, 1, 3]
    lowest = torch.finfo(torch.float32).min
    assert out.logits[1].tolist() == [lowest, _logit(EXIT0[1])[1].item(), lowest, lowest]
    assert out.logits[2].tolist() == [1.0, 3.0, 2.0, lowest]
    assert out.candidate_mask.sum(dim=1).tolist() == [1, 1, 3, 1]


def _tiny_config(**overrides) -> ClassExitResNetConfig:
    values = dict(
        num_labels=5, embedding_size=4, hidden_sizes=[4, 8], depths=[2, 2],
        exit_positions=["stem", "stage1.1", "stage1", "stage2.1"], exit_pool_size=2,
        exit_thresholds=[0.6, 0.6, 0.6, 0.6],
    )
    values.update(overrides)
    return ClassExitResNetConfig(**values)


def _trained_like(model: ClassExitResNetForImageClassification) -> ClassExitResNetForImageClassification:
    """Gives batch norm non-trivial statistics and spreads the head scores, so exits really differ."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8))
        for head in model.exit_heads:
            head.classifier.weight.mul_(2.0)
    return model.eval()


def test_batched_and_one_by_one_agree_exactly():
    torch.manual_seed(0)
    model = _trained_like(ClassExitResNetForImageClassification(_tiny_config()))
    images = torch.randn(48, 3, 8, 8)
    with torch.no_grad():
        batched = model(images)
        single = [model(image[None]) for image in images]
    # The test is only meaningful if samples leave the batch at several exits and some reach the end.
    assert 4 in batched.exit_indices.tolist() and len(set(batched.exit_indices.tolist())) >= 4
    assert batched.exit_indices.tolist() == [s.exit_indices.item() for s in single]
    assert batched.macs.tolist() == [s.macs.item() for s in single]
    assert torch.equal(batched.candidate_mask, torch.cat([s.candidate_mask for s in single]))
    assert torch.equal(batched.logits.argmax(1), torch.cat([s.logits for s in single]).argmax(1))
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in single]), rtol=1e-5, atol=1e-5)


def test_beta_zero_reproduces_full_network():
    torch.manual_seed(0)
    model = _trained_like(ClassExitResNetForImageClassification(_tiny_config(exit_thresholds=[0.0] * 4)))
    images = torch.randn(20, 3, 8, 8)
    with torch.no_grad():
        early = model(images)
        full = model(images, early_exit=False)
    assert early.exit_indices.tolist() == [4] * 20
    assert early.macs.tolist() == [model.full_macs(8, 8)] * 20
    assert early.candidate_mask.all()
    torch.testing.assert_close(early.logits, full.logits, rtol=0, atol=0)


def test_mac_count_matches_hand_count():
    config = ClassExitResNetConfig(
        num_labels=3, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1],
        exit_positions=["stem"], exit_pool_size=2, exit_thresholds=[0.5],
    )
    model = ClassExitResNetForImageClassification(config).eval()
    stem = 8 * 8 * 4 * 3 * 9  # 3x3 conv, 3 -> 4 channels, 8x8 output
    block1 = 2 * (8 * 8 * 4 * 4 * 9)  # two 3x3 convs 4 -> 4 at 8x8, identity shortcut
    block2 = 4 * 4 * 8 * 4 * 9 + 4 * 4 * 8 * 8 * 9 + 4 * 4 * 8 * 4  # stride-2 conv, conv, 1x1 projection
    head = (4 * 2 * 2) * 3  # 2x2 pooled stem features -> 3 classes
    classifier = 8 * 3
    assert model.unit_macs(8, 8) == ([stem, block1, block2], [head], classifier)
    assert model.full_macs(8, 8) == stem + block1 + block2 + classifier == 39704
    # The shared hook-based counter (an independent implementation) agrees, heads included when they run.
    from hf_compress.vision.counting import count_params_and_macs

    assert count_params_and_macs(model, (3, 8, 8), {"early_exit": False}).macs == 39704 + head
    imagenet = ClassExitResNetForImageClassification(ClassExitResNetConfig(
        num_labels=3, stem_type="imagenet", embedding_size=4, hidden_sizes=[8, 8], depths=[1, 1], layer_type="bottleneck",
        exit_positions=["stage1"], exit_thresholds=[0.0],
    ))
    assert count_params_and_macs(imagenet, (3, 29, 29)).macs == imagenet.full_macs(29, 29)
    with torch.no_grad():
        out = model(torch.randn(64, 3, 8, 8) * 3)
    for exit_index, macs in zip(out.exit_indices.tolist(), out.macs.tolist()):
        assert macs == (stem + head if exit_index == 0 else stem + block1 + block2 + head + classifier)


def test_zero_pad_shortcut_resnet20_size():
    """He et al.'s ResNet-20 (option A shortcuts): 0.27M parameters, 40.55M MACs at 32x32."""
    config = ClassExitResNetConfig(num_labels=10, depths=[3, 3, 3], shortcut_type="zero_pad", exit_positions=[])
    model = ClassExitResNetForImageClassification(config)
    # conv weights + batch-norm scale and shift per stage, then the classifier
    stem = 3 * 16 * 9 + 2 * 16
    stages = (6 * 16 * 16 * 9 + 12 * 16) + (16 * 32 * 9 + 5 * 32 * 32 * 9 + 12 * 32) + (32 * 64 * 9 + 5 * 64 * 64 * 9 + 12 * 64)
    assert sum(p.numel() for p in model.parameters()) == stem + stages + 64 * 10 + 10 == 269722
    convs = 32 * 32 * 16 * 3 * 9 + 6 * 32 * 32 * 16 * 16 * 9
    convs += 16 * 16 * 32 * 16 * 9 + 5 * 16 * 16 * 32 * 32 * 9
    convs += 8 * 8 * 64 * 32 * 9 + 5 * 8 * 8 * 64 * 64 * 9
    assert model.full_macs(32, 32) == convs + 64 * 10


def test_joint_loss_matches_formula():
    torch.manual_seed(0)
    final, exits = torch.randn(6, 4), [torch.randn(6, 4), torch.randn(6, 4)]
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    expected = torch.nn.functional.cross_entropy(final, labels)
    for weight, logits in zip([1 / 2, 1.0], exits):
        target = torch.nn.functional.one_hot(labels, 4).float()
        per_entry = -(target * torch.log(torch.sigmoid(logits)) + (1 - target) * torch.log(1 - torch.sigmoid(logits)))
        expected = expected + weight * per_entry.sum() / 6  # summed over the classes, averaged over the batch
    torch.testing.assert_close(joint_exit_loss(final, exits, labels), expected)
    confidence = torch.nn.functional.cross_entropy(final, labels) + sum(
        w * torch.nn.functional.cross_entropy(l, labels) for w, l in zip([0.5, 1.0], exits)
    )
    torch.testing.assert_close(joint_exit_loss(final, exits, labels, "confidence"), confidence)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(exit_thresholds=[0.5, 1.0, 0.1, 0.1]), "must be in (0, 1)"),
        (dict(exit_thresholds=[0.5, -0.1, 0.1, 0.1]), "must be in (0, 1)"),
        (dict(exit_thresholds=[0.5, 0.5]), "has 2 values but there are 4 exits"),
        (dict(exit_positions=["stage3"], exit_thresholds=[0.5]), "stages stage1..stage2"),
        (dict(exit_positions=["stage1.3"], exit_thresholds=[0.5]), "stage1 has blocks 1..2"),
        (dict(exit_positions=["stage2"], exit_thresholds=[0.5]), "end of the network"),
        (dict(exit_positions=["layer1"], exit_thresholds=[0.5]), "is not 'stem'"),
        (dict(exit_positions=["stage1", "stem"], exit_thresholds=[0.5, 0.5]), "in network order"),
        (dict(exit_rule="confidence", exit_thresholds=[0.5, 0.0, 0.9, 1.0]), "confidence threshold"),
    ],
)
def test_bad_exit_config(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _tiny_config(**overrides)


def test_save_load_and_remote_code_round_trip(tmp_path):
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = _trained_like(ClassExitResNetForImageClassification(_tiny_config()))
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_class_exit_resnet.ClassExitResNetConfig",
        "AutoModelForImageClassification": "modeling_class_exit_resnet.ClassExitResNetForImageClassification",
    }
    assert (tmp_path / "ckpt" / "modeling_class_exit_resnet.py").exists()
    images = torch.randn(32, 3, 8, 8)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        reference = model(images)
        reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "ckpt").eval()
        assert type(reloaded) is ClassExitResNetForImageClassification
        again = reloaded(images)
    assert torch.equal(reference.logits, again.logits) and torch.equal(reference.macs, again.macs)

    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_compress"] = None  # the plugin must not be importable
        import torch
        from transformers import AutoModelForImageClassification
        torch.set_num_threads(1)
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert "hf_compress" not in type(model).__module__, type(model).__module__
        with torch.no_grad():
            out = model.eval()(torch.load({str(tmp_path / "images.pt")!r}))
        torch.save({{"logits": out.logits, "exits": out.exit_indices, "macs": out.macs}}, {str(tmp_path / "remote.pt")!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt")
    assert torch.equal(remote["logits"], reference.logits)
    assert torch.equal(remote["exits"], reference.exit_indices)
    assert torch.equal(remote["macs"], reference.macs)
