"""Tests of hf_compress.vision.training and hf_compress.vision.counting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_compress.errors import HFCompressError
from hf_compress.vision.counting import count_params_and_macs
from hf_compress.data.images import ImageClassificationData
from hf_compress.vision.training import evaluate_accuracy, predict_logits, train_classifier

torch.set_num_threads(2)


class TinyNet(nn.Module):
    """conv 3->4 (k3, pad 1) on 8x8, grouped conv 4->6 (k3, stride 2, groups 2), pool, linear 6->3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(pixel_values)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _blobs(n: int, seed: int) -> ImageClassificationData:
    """Three classes told apart by which colour channel is bright: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 90, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[torch.arange(n), labels] += 150
    return ImageClassificationData(images, labels, ["r", "g", "b"])


def test_macs_and_params_match_a_hand_count():
    counts = count_params_and_macs(TinyNet(), input_size=(3, 8, 8))
    conv1 = 4 * 8 * 8 * 3 * 9  # out channels x out pixels x in channels x kernel area
    conv2 = 6 * 4 * 4 * (4 // 2) * 9  # stride 2 -> 4x4; each output sees in/groups channels
    fc = 6 * 3
    assert counts.layers == {"conv1": conv1, "conv2": conv2, "fc": fc}
    assert counts.macs == conv1 + conv2 + fc == 8658
    assert counts.params == (4 * 3 * 9) + (4 + 4) + (6 * 2 * 9 + 6) + (6 * 3 + 3)


def test_training_learns_and_uses_the_custom_loss():
    torch.manual_seed(0)
    model, train, test = TinyNet(), _blobs(96, 0), _blobs(60, 1)
    before = evaluate_accuracy(model, test)
    calls = []

    def loss_fn(m, images, labels):
        calls.append(len(labels))
        return F.cross_entropy(m(pixel_values=images), labels) + 0.0 * sum(p.sum() for p in m.parameters())

    history = train_classifier(
        model, train, epochs=6, lr=0.2, batch_size=32, loss_fn=loss_fn, augment=False, eval_data=test, progress=False
    )
    assert calls == [32, 32, 32] * 6  # every batch went through loss_fn
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.eval_accuracy[-1] == evaluate_accuracy(model, test) > max(0.9, before)
    # cosine schedule: the lr recorded at the start of epoch e is lr * (1 + cos(pi * e / 6)) / 2
    assert history.learning_rate == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 6)) for e in range(6)])


def test_evaluate_accuracy_against_a_manual_count():
    model = TinyNet().eval()
    data = _blobs(30, 2)
    logits = predict_logits(model, data, batch_size=7)
    with torch.no_grad():
        expected = model(pixel_values=data.normalize(data.images))
    assert torch.allclose(logits, expected, atol=1e-6)
    manual = sum(int(expected[i].argmax() == data.labels[i]) for i in range(30)) / 30
    assert evaluate_accuracy(model, data, batch_size=7) == pytest.approx(manual)


def test_bad_training_input():
    with pytest.raises(HFCompressError, match="schedule"):
        train_classifier(TinyNet(), _blobs(6, 0), epochs=1, schedule="linear", progress=False)
    with pytest.raises(HFCompressError, match="empty"):
        evaluate_accuracy(TinyNet(), _blobs(6, 0).subset([]))


def test_training_resumes_after_an_interrupt_to_the_same_weights(tmp_path):
    """A run interrupted mid-epoch and resumed from its per-epoch state ends with the weights of a run never stopped."""
    data = _blobs(48, seed=5)
    kwargs = dict(epochs=3, lr=0.05, batch_size=12, seed=7, progress=False)

    torch.manual_seed(0)
    straight = TinyNet()
    train_classifier(straight, data, **kwargs)

    calls = {"n": 0}

    def interrupting_loss(model, images, labels):
        calls["n"] += 1
        if calls["n"] == 6:  # the second batch of epoch 2 (4 batches per epoch)
            raise KeyboardInterrupt
        return F.cross_entropy(model(pixel_values=images).float(), labels)

    torch.manual_seed(0)
    first = TinyNet()
    with pytest.raises(KeyboardInterrupt):
        train_classifier(first, data, loss_fn=interrupting_loss, resume_dir=tmp_path, **kwargs)
    stored = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert stored["epoch"] == 1 and len(stored["history"]["train_loss"]) == 1

    torch.manual_seed(123)  # a different initialisation: the stored weights must replace it
    resumed = TinyNet()
    history = train_classifier(resumed, data, resume_dir=tmp_path, **kwargs)
    assert len(history.train_loss) == 3
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    with pytest.raises(HFCompressError, match="other settings"):
        train_classifier(TinyNet(), data, resume_dir=tmp_path, **{**kwargs, "lr": 0.1})
