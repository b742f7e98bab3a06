"""Measured per-image latency of each part of a ClassExitResNet, as costs for the threshold search.

MACs are a poor proxy for time on some devices: on 2 CPU cores a ResNet-20 unit on 32x32 maps with 16 channels
takes about 1.4x the time its MACs predict and one on 8x8 maps with 64 channels about 0.7x, and an exit head (a
pooling over a whole feature map, then a tiny linear layer) costs 0.5% of the network's time for 0.003% of its
MACs. `measure_exit_costs` times every backbone unit, exit head and the final classifier in the model's own
forward (forward hooks, every head evaluated), so that `search_thresholds(..., costs=...)` minimises the time the
exits take on this device instead of their MACs.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from ..data.images import ImageClassificationData
from ..errors import HFCompressError
from ..modeling.class_exit_resnet import ClassExitResNetForImageClassification
from .search import ExitCosts

# The batch of the timed forwards: the inference batch the exit report and the benchmarks time at.
LATENCY_BATCH = 256


class ModuleTimer:
    """Forward hooks that add up, per named module, the seconds its forwards take and the images they process,
    under the label `current` (several configurations may share one model and its timer)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.current = ""
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.images: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(module, inputs):
            self._sync(inputs[0])
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name: str):
        def hook(module, inputs, output):
            self._sync(output)
            self.seconds[self.current][name] += time.perf_counter() - self._start.pop(name)
            self.images[self.current][name] += int(inputs[0].shape[0])
        return hook

    @staticmethod
    def _sync(tensor: torch.Tensor) -> None:
        # GPU kernels run asynchronously: without a sync each module would be charged for its predecessors.
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)

    def reset(self) -> None:
        self.seconds.clear()
        self.images.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def timed_modules(model: ClassExitResNetForImageClassification) -> dict[str, torch.nn.Module]:
    """The modules a profile times: `unit<i>` (stem and residual units, in order), `head<e>` (exit heads),
    `final_pool` and `final_linear` (the final classifier)."""
    modules = {f"unit{index}": unit for index, unit in enumerate(model.resnet.units())}
    modules.update({f"head{index}": head for index, head in enumerate(model.exit_heads)})
    modules.update({"final_pool": model.resnet.pooler, "final_linear": model.classifier})
    return modules


@torch.no_grad()
def measure_exit_costs(
    model: ClassExitResNetForImageClassification,
    data: ImageClassificationData,
    batch_size: int = LATENCY_BATCH,
    max_batches: int = 8,
    rounds: int = 2,
) -> ExitCosts:
    """Nanoseconds per image of every unit, exit head and the final classifier of `model`, timed on its device in
    full mode (every head evaluated) over the first `max_batches` batches of `data`, `rounds` passes after one
    untimed warm-up batch."""
    if len(data) == 0:
        raise HFCompressError("no data to time the exits on")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = [images.to(device) for images, _ in data.batches(batch_size)][:max_batches]
    modules = timed_modules(model)
    timer = ModuleTimer(modules)
    try:
        model(pixel_values=batches[0], early_exit=False)
        timer.reset()
        for _ in range(rounds):
            for images in batches:
                model(pixel_values=images, early_exit=False)
    finally:
        timer.remove()
        model.train(was_training)
    seconds, images = timer.seconds[""], timer.images[""]

    def ns(*names: str) -> int:
        # At least 1: a zero cost would make a part free and the search indifferent to it.
        return max(1, round(1e9 * sum(seconds[n] / images[n] for n in names)))

    return ExitCosts(units=[ns(name) for name in modules if name.startswith("unit")],
                     heads=[ns(name) for name in modules if name.startswith("head")],
                     classifier=ns("final_pool", "final_linear"), unit="ns")
