"""The Basis Sharing compressor: calibration Grams, whitened group SVDs, ranks and coefficient fits, layer by layer."""

from __future__ import annotations

import copy
import logging
import time

import torch
from tqdm.auto import tqdm

from ..device import MemoryPhases
from ..modeling.shared_basis_llama import SharedBasisLinear
from .calibration import (
    FORWARD_ORDER,
    GRAM_KEY,
    LayerRunner,
    accumulate_gram,
    gram_keys,
    layer_grams,
    record_inputs,
    stage_inputs,
    symmetrize,
)
from .config import BasisSharingConfig
from .decomposition import (
    GroupFactors,
    allocate_ranks,
    factors_at_rank,
    refit_coefficients,
    shape_spectrum,
    spectrum,
    whiten,
)
from .layout import dense_weight, projection, set_projection

logger = logging.getLogger(__name__)

def block_spans(groups: dict[str, list[list[int]]], num_layers: int) -> list[list[int]]:
    """Smallest runs of consecutive layers that contain whole groups of every type (groups of 2 -> pairs)."""
    reach = list(range(num_layers))
    for type_groups in groups.values():
        for group in type_groups:
            for layer in group:
                reach[layer] = max(reach[layer], max(group))
    spans, start, end = [], 0, -1
    for layer in range(num_layers):
        end = max(end, reach[layer])
        if layer == end:
            spans.append(list(range(start, end + 1)))
            start = layer + 1
    return spans


class BasisSharingCompressor:
    """Layer-by-layer Basis Sharing of a loaded Llama-family model.

    `run()` returns the factors of every group; only one decoder layer and the calibration activations are on
    `device` at a time, the model itself stays where it was loaded.

    With a `sink` (e.g. `assembly.LayerwiseAssembly`), `sink.start(groups, ranks)` is called once the ranks are
    known and `sink.add_block(span, factors)` as soon as the groups of each block of layers are final; their tensors
    are then dropped, and `run()` returns the factors with meta tensors (shapes and ranks only). The compressor
    never reads a layer again after its block went to the sink, so the sink may free it.
    """

    def __init__(self, model, options: BasisSharingConfig, calibration_ids: torch.Tensor, device: torch.device,
                 batch_size: int = 8, progress: bool = True, dtype: torch.dtype = torch.float32,
                 phases: MemoryPhases | None = None, sink=None):
        self.model = model
        self.sink = sink
        # Peak memory per phase, for the conversion summary (a fresh recorder when the caller keeps none).
        self.phases = phases if phases is not None else MemoryPhases()
        self.ids = calibration_ids
        self.device = device
        self.progress = progress
        self.num_layers = model.config.num_hidden_layers
        # `convert` hands over a resolved config; benchmarks and tests may not (resolving twice changes nothing).
        options.validate()
        options.check_layers(self.num_layers)
        self.options = options = options.resolve(device)
        self.groups = options.groups(self.num_layers)
        self.keys = gram_keys(self.groups)
        self.runner = LayerRunner(model, calibration_ids.shape[1], device, batch_size, dtype)
        self.whitening_shifts: dict[str, list[float]] = {name: [] for name in self.groups}
        self.timings: dict[str, float] = {}
        widest = max(dense_weight(model.model.layers[0], name).shape[0] for name in self.groups)
        if calibration_ids.numel() < widest:
            logger.warning(
                "calibration has %d tokens, fewer than the widest Gram (%d) needs to be full rank: Grams are damped.",
                calibration_ids.numel(), widest,
            )

    # -- streams of calibration hidden states -------------------------------------------------------------
    @torch.no_grad()
    def _embeddings(self) -> torch.Tensor:
        """The calibration stream entering layer 0, float32 on the device (written batch by batch)."""
        embed = self.model.model.embed_tokens
        hidden = torch.empty(*self.ids.shape, embed.embedding_dim, dtype=torch.float32, device=self.device)
        for rows in self.runner.batches(self.ids.shape[0]):
            hidden[rows] = embed(self.ids[rows].to(embed.weight.device)).to(self.device, torch.float32)
        return hidden

    def _layer(self, layer_idx: int):
        return self.model.model.layers[layer_idx].to(self.device)

    def _offload(self, layer_idx: int) -> None:
        if self.device.type != "cpu":
            self.model.model.layers[layer_idx].to("cpu")

    # -- the two phases -------------------------------------------------------------------------------------
    def dense_grams(self) -> list[dict[str, torch.Tensor]]:
        """Grams of every layer on the dense model's own activations (kept on the CPU)."""
        hidden = self._embeddings()
        grams = []
        for layer_idx in tqdm(range(self.num_layers), desc="calibration", unit="layer", disable=not self.progress):
            layer_grams_, hidden = layer_grams(self.runner, self._layer(layer_idx), hidden, layer_idx, self.keys)
            grams.append({k: v.cpu() for k, v in layer_grams_.items()})
            self._offload(layer_idx)
        return grams

    def _spectrum(self, name: str, group: list[int], grams_by_layer: dict[int, dict[str, torch.Tensor]],
                  whitenings: dict | None = None):
        """Whitened spectrum of one group; `whitenings` caches the Cholesky factor of each (input, group), which
        q/k/v (and gate/up) share."""
        weights = [dense_weight(self.model.model.layers[l], name).to(self.device) for l in group]
        if not self.options.whiten:
            return spectrum(name, group, weights, None)
        key = (GRAM_KEY[name], tuple(group))
        whitening = whitenings.get(key) if whitenings is not None else None
        if whitening is None:
            # The summed Gram is handed over to `whiten` (no reference kept here), which then frees it early.
            whitening = whiten(self._group_gram(name, group, grams_by_layer))
            if whitenings is not None:
                whitenings[key] = whitening
        return spectrum(name, group, weights, None, whitening=whitening)

    def _group_gram(self, name: str, group: list[int], grams_by_layer) -> torch.Tensor:
        """The float64 sum of the members' Grams (as `sum(...)` adds them, in place into one tensor)."""
        grams = (grams_by_layer[l][GRAM_KEY[name]] for l in group)
        total = next(grams).to(self.device, torch.float64, copy=True)
        for gram in grams:
            total += gram.to(self.device, torch.float64)
        return total

    def _ranks(self, dense_grams: list[dict[str, torch.Tensor]]) -> dict[str, list[int]]:
        """Ranks of every group, from the formula or from the spectra of the whole model."""
        spectra, owners = [], []
        needs_spectra = self._ranks_need_spectra()
        grams_by_layer = dict(enumerate(dense_grams)) if needs_spectra else {}
        for span in block_spans(self.groups, self.num_layers):
            # Per block, and each one dropped after its last user, so few Cholesky factors are held at a time.
            whitenings = _Whitenings(self.groups, span)
            for name, groups in self.groups.items():
                for group_idx, group in enumerate(groups):
                    if group[0] not in span:
                        continue
                    if needs_spectra:
                        spec = self._spectrum(name, group, grams_by_layer, whitenings)
                        whitenings.used(name, group)
                        # Only the singular values are needed to choose ranks; drop the factors to save memory.
                        spec.left, spec.right, spec.whitening = spec.left[:, :0], spec.right[:0], None
                    else:
                        d_in, d_out = dense_weight(self.model.model.layers[group[0]], name).shape
                        spec = shape_spectrum(name, group, d_in, d_out)
                    spectra.append(spec)
                    owners.append((name, group_idx))
        ranks = allocate_ranks(spectra, self.options.ratio, strategy=self.options.rank_allocation,
                               multiple=self.options.rank_multiple, score=self.options.rank_score)
        result: dict[str, list[int]] = {name: [0] * len(groups) for name, groups in self.groups.items()}
        for (name, group_idx), rank in zip(owners, ranks):
            result[name][group_idx] = rank
        return result

    @property
    def sequential(self) -> bool:
        """Whether calibration is sequential in effect: plain SVD has no Grams to take from anywhere."""
        return self.options.sequential and self.options.whiten

    @property
    def runs_forwards(self) -> bool:
        """Whether `run` passes calibration data through the layers: plain SVD without refit never does."""
        return self.options.whiten or self.options.refit

    def _ranks_need_spectra(self) -> bool:
        """Global allocation needs every group's spectrum up front. With rank multiples, the chunks left over after
        rounding go where the dense spectra say they remove most loss, but only when those spectra come for free:
        sequential calibration has no dense pass, so there they are spread by shape alone."""
        opts = self.options
        return opts.rank_allocation == "global" or (opts.rank_multiple > 1 and not self.sequential)

    def needs_dense_grams(self) -> bool:
        """Whether `run` uses Grams of the dense model: for whitening unless calibration is sequential, and for
        choosing ranks from the spectra."""
        return self.options.whiten and (not self.sequential or self._ranks_need_spectra())

    @torch.no_grad()
    def run(self, dense_grams: list[dict[str, torch.Tensor]] | None = None) -> dict[str, list[GroupFactors]]:
        """Factors of every group. `dense_grams` (from `dense_grams()`) can be passed in to reuse one calibration
        pass across several settings on the same model and data."""
        sequential = self.sequential
        if dense_grams is None and self.needs_dense_grams():
            start = time.perf_counter()
            with self.phases("calibration"):
                dense_grams = self.dense_grams()
            self.timings["calibration_s"] = time.perf_counter() - start
        # Sequential calibration happens inside the decomposition loop, block by block: one phase.
        phase = "calibration_and_decomposition" if sequential else "decomposition"
        with self.phases(phase):
            factors = self._decompose(dense_grams)
        return factors

    def _decompose(self, dense_grams: list[dict[str, torch.Tensor]] | None) -> dict[str, list[GroupFactors]]:
        """The block loop of `run`: ranks, then each block's Grams (sequential) and its groups' factors."""
        opts = self.options
        start = time.perf_counter()
        ranks = self._ranks(dense_grams or [])
        factors: dict[str, list[GroupFactors | None]] = {n: [None] * len(g) for n, g in self.groups.items()}
        needs_stream = self.sequential or opts.refit
        comp_hidden = self._embeddings() if needs_stream else None
        # The dense model's own stream is only needed for the refit's targets.
        dense_hidden = comp_hidden.clone() if opts.refit else None
        spans = block_spans(self.groups, self.num_layers)
        if self.sink is not None:
            self.sink.start(self.groups, ranks)
        bar = tqdm(total=self.num_layers, desc="decomposition", unit="layer", disable=not self.progress)
        for span in spans:
            # The block's Grams live only inside this call: freed before the stream moves on.
            self._factor_block(span, self._block_grams(span, comp_hidden, dense_grams), ranks, factors)
            if needs_stream:
                dense_hidden = self._advance_block(span, span is spans[-1], factors, comp_hidden, dense_hidden)
            if self.sink is not None:
                self._hand_over(span, factors)
            bar.update(len(span))
        bar.close()
        # Sequential calibration happens inside this loop, block by block, so it is not a phase of its own.
        phase = "calibration_and_decomposition_s" if self.sequential else "decomposition_s"
        self.timings[phase] = time.perf_counter() - start
        return {name: list(groups) for name, groups in factors.items()}

    def _block_grams(self, span: list[int], comp_hidden: torch.Tensor | None,
                     dense_grams: list[dict[str, torch.Tensor]] | None) -> dict[int, dict[str, torch.Tensor]]:
        """The Grams of the block's layers: computed on the compressed stream (sequential) or taken from
        `dense_grams`."""
        if not self.sequential:
            return {layer: dense_grams[layer] for layer in span} if dense_grams else {}
        grams_by_layer, hidden = {}, comp_hidden
        for layer_idx in span:
            # The last layer's dense outputs feed nothing: the stream goes on from the compressed layers.
            grams_by_layer[layer_idx], hidden = layer_grams(self.runner, self._layer(layer_idx), hidden,
                                                            layer_idx, self.keys, outputs=layer_idx != span[-1])
        return grams_by_layer  # the dense outputs inside the block are dropped: the stream goes on from `comp_hidden`

    def _factor_block(self, span: list[int], grams_by_layer: dict[int, dict[str, torch.Tensor]],
                      ranks: dict[str, list[int]], factors: dict[str, list[GroupFactors | None]]) -> None:
        """Factors every group that starts in `span` at its rank, into `factors` (on the CPU)."""
        opts = self.options
        whitenings = _Whitenings(self.groups, span)
        for name, groups in self.groups.items():
            for group_idx, group in enumerate(groups):
                if group[0] not in span:
                    continue
                spec = self._spectrum(name, group, grams_by_layer, whitenings)
                whitenings.used(name, group)
                if spec.whitening is not None:
                    self.whitening_shifts[name].append(spec.whitening.shift)
                group_factors = factors_at_rank(spec, ranks[name][group_idx])
                whitened = spec.whitening is not None
                del spec  # its full-rank factors
                if opts.layer_fit and whitened and not opts.refit and len(group) > 1:
                    group_factors = self._fit_layers(group_factors, grams_by_layer)
                factors[name][group_idx] = _to_cpu(group_factors)

    def _advance_block(self, span: list[int], last_block: bool, factors: dict[str, list[GroupFactors | None]],
                       comp_hidden: torch.Tensor, dense_hidden: torch.Tensor | None) -> torch.Tensor | None:
        """Runs the calibration stream through the block's compressed layers (in place), refitting them first when
        asked, and releases the dense layers; returns the dense stream (refit only)."""
        for layer_idx in span:
            dense_layer = self._layer(layer_idx)
            compressed = self._compressed_layer(layer_idx, factors)
            if self.options.refit:
                dense_hidden = self._refit_layer(layer_idx, dense_layer, compressed, dense_hidden, comp_hidden,
                                                 factors)
            # The stream is read by the next block's calibration and by the next layer's refit: after the last
            # block, only a refit of its later layers still needs it.
            if not last_block or (self.options.refit and layer_idx != span[-1]):
                _advance(self.runner, compressed, comp_hidden, layer_idx)
            del compressed
            self._offload(layer_idx)
        return dense_hidden

    def _hand_over(self, span: list[int], factors: dict[str, list[GroupFactors | None]]) -> None:
        """Gives the block's final groups to the sink and keeps only their shapes."""
        block = {name: [g for g in groups if g is not None and g.layers[0] in span] for name, groups in factors.items()}
        self.sink.add_block(span, block)
        for name, groups in factors.items():
            for group_idx, group in enumerate(groups):
                if group is not None and group.layers[0] in span:
                    groups[group_idx] = _shapes_only(group)

    def _fit_layers(self, group: GroupFactors, grams_by_layer: dict[int, dict[str, torch.Tensor]]) -> GroupFactors:
        """Each member's coefficients re-solved by least squares on its own Gram, for the shared basis.

        The group's SVD fits every member on the summed Gram, as if all members saw the same inputs; they do not, and
        for a fixed basis each layer's own least-squares fit can only lower its output error on the calibration data.
        """
        coefficients = []
        for layer_idx in group.layers:
            gram = grams_by_layer[layer_idx][GRAM_KEY[group.name]].to(self.device, torch.float64)
            weight = dense_weight(self.model.model.layers[layer_idx], group.name).to(self.device)
            coefficients.append(refit_coefficients(group.basis, weight, gram, gram))
        return GroupFactors(group.name, group.layers, group.basis, coefficients)

    # -- compressed copies of single layers -----------------------------------------------------------------
    def _compressed_layer(self, layer_idx: int, factors: dict[str, list[GroupFactors | None]]):
        """A copy of decoder layer `layer_idx` whose compressed projections use their current factors."""
        layer = copy.deepcopy(self.model.model.layers[layer_idx]).to(self.device)
        for name, groups in factors.items():
            group = next(g for g in groups if g is not None and layer_idx in g.layers)
            dense = projection(layer, name)
            basis = torch.nn.Linear(group.basis.shape[0], group.rank, bias=False).to(self.device)
            basis.weight.data = group.basis.T.to(self.device, dense.weight.dtype).contiguous()
            module = SharedBasisLinear(basis, dense.out_features, dense.bias is not None).to(self.device)
            coefficients = group.coefficients[group.layers.index(layer_idx)]
            module.coefficients.data = coefficients.T.to(self.device, dense.weight.dtype).contiguous()
            if dense.bias is not None:
                module.bias.data = dense.bias.data.clone()
            set_projection(layer, name, module)
        return layer

    def _refit_layer(self, layer_idx, dense_layer, compressed, dense_hidden, comp_hidden, factors) -> torch.Tensor:
        """Refits the coefficients of `compressed` in place, input by input in forward order, so that each stage sees
        the inputs that the already-refit projections before it produce (o after q/k/v, down after gate/up).

        One dense forward records every stage's target inputs; the compressed layer is re-run per stage only up to
        that stage's projection. Returns the dense layer's outputs (the next dense hidden states).
        """
        stages = tuple(key for key in FORWARD_ORDER if any(GRAM_KEY[name] == key for name in factors))
        targets, dense_out = record_inputs(self.runner, dense_layer, dense_hidden, layer_idx, stages)
        for key in stages:
            gram_hat = cross = None
            for rows, x_hat in stage_inputs(self.runner, compressed, comp_hidden, layer_idx, key):
                x_hat = x_hat.float()
                x = targets[key][rows].to(x_hat.device, torch.float32)
                gram_hat = accumulate_gram(gram_hat, x_hat)
                cross = x_hat.T @ x if cross is None else cross.addmm_(x_hat.T, x)
            gram_hat = symmetrize(gram_hat)
            del targets[key]
            for name in (name for name in factors if GRAM_KEY[name] == key):
                group = next(g for g in factors[name] if layer_idx in g.layers)
                refit = refit_coefficients(group.basis.to(self.device), dense_weight(dense_layer, name),
                                           gram_hat.double(), cross.double())
                group.coefficients[group.layers.index(layer_idx)] = refit.cpu()
                module = projection(compressed, name)
                module.coefficients.data = refit.T.to(module.coefficients.dtype).contiguous()
        return dense_out


class _Whitenings(dict):
    """The Cholesky factors of one block, keyed by (Gram key, group): q/k/v (and gate/up) share theirs. Each is
    dropped once the last projection type of the block that reads it has used it (`used`)."""

    def __init__(self, groups: dict[str, list[list[int]]], span: list[int]):
        super().__init__()
        self.users: dict[tuple, int] = {}
        for name, type_groups in groups.items():
            for group in type_groups:
                if group[0] in span:
                    key = (GRAM_KEY[name], tuple(group))
                    self.users[key] = self.users.get(key, 0) + 1

    def used(self, name: str, group: list[int]) -> None:
        key = (GRAM_KEY[name], tuple(group))
        self.users[key] -= 1
        if self.users[key] == 0:
            self.pop(key, None)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU, in memory of its own: a slice of a larger factor (the rows of `V^T` kept at the rank)
    would otherwise hold all of it."""
    tensor = tensor.cpu()
    return tensor.clone() if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size() else tensor


def _to_cpu(factors: GroupFactors) -> GroupFactors:
    return GroupFactors(factors.name, factors.layers, _compact(factors.basis), [_compact(c) for c in factors.coefficients])


def _shapes_only(factors: GroupFactors) -> GroupFactors:
    """The group with meta tensors of the same shapes and dtypes (ranks and parameter counts, no values)."""
    return GroupFactors(factors.name, factors.layers, factors.basis.to("meta"),
                        [c.to("meta") for c in factors.coefficients])


@torch.no_grad()
def _advance(runner: LayerRunner, layer, hidden: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Runs `layer` over the stream and writes its outputs over it, batch by batch (each batch's rows are read
    before they are overwritten, and a layer mixes no samples), so no second stream is allocated."""
    for rows, output in runner.run(layer, hidden, layer_idx):
        hidden[rows] = output.to(hidden.dtype)
    return hidden


def count_compressed_params(factors: dict[str, list[GroupFactors]]) -> int:
    return sum(f.basis.numel() + sum(c.numel() for c in f.coefficients) for groups in factors.values() for f in groups)


def dense_projection_params(model, names) -> int:
    return sum(projection(layer, name).weight.numel() for layer in model.model.layers for name in names)


