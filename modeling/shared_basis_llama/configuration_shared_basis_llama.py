"""SharedBasisLlama configuration.

Standalone remote code: imports only the standard library and transformers.
"""

from __future__ import annotations

from numbers import Integral

from transformers import LlamaConfig

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


def _is_int(value) -> bool:
    # JSON gives ints (code may pass numpy ints); a bool, float or string means a hand-edited or corrupted config.
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_basis_field_types(basis_groups, basis_ranks) -> None:
    """Raises `ValueError` naming the field unless `basis_groups` is `{name: [[int, ...], ...]}` and `basis_ranks` is
    `{name: [int, ...]}` (either may be `None`)."""
    for field, value, depth in (("basis_groups", basis_groups, 2), ("basis_ranks", basis_ranks, 1)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{field} must map projection names to lists, got {type(value).__name__}.")
        for name, entries in value.items():
            rows = entries if isinstance(entries, list) and depth == 2 else [entries]
            if not all(isinstance(row, list) and all(_is_int(item) for item in row) for row in rows):
                shape = "a list of lists of layer indices (ints)" if depth == 2 else "a list of ints"
                raise ValueError(f"{field}[{name!r}] must be {shape}, got {entries!r}.")


class SharedBasisLlamaConfig(LlamaConfig):
    r"""
    Configuration of a Llama-family decoder whose linear projections are factorised with Basis Sharing.

    For each projection type (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`) the
    decoder layers are partitioned into groups. A group stores one basis `B` (`d_in x k`) shared by its layers, and
    every layer of the group keeps its own coefficients `C_i` (`k x d_out`), so the layer computes
    `x -> (x B) C_i (+ bias)`. A group of one layer is a plain low-rank factorisation; a type listed in
    `dense_projections` keeps its ordinary dense weight.

    Args:
        basis_groups (`dict[str, list[list[int]]]`, *optional*):
            For each factorised projection type, the groups as lists of layer indices. The groups of one type must
            cover every layer exactly once.
        basis_ranks (`dict[str, list[int]]`, *optional*):
            For each factorised projection type, the rank of each group (same order as `basis_groups`).
        dense_projections (`list[str]`, *optional*):
            Projection types left dense. Every type is either factorised or dense; by default all types not in
            `basis_groups` are dense.
        qkv_bias (`bool`, *optional*):
            Whether q, k and v carry a bias while o does not (Qwen2 layout). Defaults to `attention_bias`.
        compression (`dict`, *optional*):
            Provenance of the compression (method, target and achieved ratio, calibration data, source model,
            hf_compress version). Informational; never read by the forward pass.
        fuse_bases (`bool`, *optional*, defaults to `False`):
            Load-time option: run the bases of q/k/v (and of gate/up) as one matrix product per layer. The checkpoint
            format does not change.
        densify_above_break_even (`bool`, *optional*, defaults to `False`):
            Load-time option: multiply factor pairs whose rank is past `d_in d_out / (d_in + d_out)` back into
            dense weights, where that is cheaper to run (costs memory; reported by `densify_above_break_even()`).
        kwargs:
            Any `LlamaConfig` argument.
    """

    model_type = "shared_basis_llama"

    def __init__(
        self,
        basis_groups: dict[str, list[list[int]]] | None = None,
        basis_ranks: dict[str, list[int]] | None = None,
        dense_projections: list[str] | None = None,
        qkv_bias: bool | None = None,
        compression: dict | None = None,
        fuse_bases: bool = False,
        densify_above_break_even: bool = False,
        **kwargs,
    ):
        check_basis_field_types(basis_groups, basis_ranks)
        self.basis_groups = {name: [list(map(int, g)) for g in groups] for name, groups in (basis_groups or {}).items()}
        self.basis_ranks = {name: [int(r) for r in ranks] for name, ranks in (basis_ranks or {}).items()}
        if dense_projections is None:
            dense_projections = [name for name in PROJECTIONS if name not in self.basis_groups]
        self.dense_projections = list(dense_projections)
        self.qkv_bias = qkv_bias
        self.compression = compression
        self.fuse_bases = fuse_bases
        self.densify_above_break_even = densify_above_break_even
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_shared_basis_llama.SharedBasisLlamaConfig",
                "AutoModel": "modeling_shared_basis_llama.SharedBasisLlamaModel",
                "AutoModelForCausalLM": "modeling_shared_basis_llama.SharedBasisLlamaForCausalLM",
            },
        )
        super().__init__(**kwargs)
        if self.qkv_bias is None:
            self.qkv_bias = bool(self.attention_bias)
        self.validate_basis_sharing()

    def projection_shape(self, name: str) -> tuple[int, int]:
        """Returns `(d_in, d_out)` of projection type `name` (so that `y = x W` with `W` of that shape)."""
        attn_width = self.num_attention_heads * self.head_dim
        kv_width = self.num_key_value_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, attn_width),
            "k_proj": (self.hidden_size, kv_width),
            "v_proj": (self.hidden_size, kv_width),
            "o_proj": (attn_width, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        if name not in shapes:
            raise ValueError(f"Unknown projection {name!r}; expected one of {list(PROJECTIONS)}.")
        return shapes[name]

    def projection_has_bias(self, name: str) -> bool:
        """Whether projection type `name` carries a bias."""
        if name in ("q_proj", "k_proj", "v_proj"):
            return bool(self.qkv_bias)
        if name == "o_proj":
            return bool(self.attention_bias)
        return bool(self.mlp_bias)

    def group_of(self, name: str, layer_idx: int) -> int:
        """Index of the group of projection type `name` that holds layer `layer_idx`."""
        for group_idx, group in enumerate(self.basis_groups[name]):
            if layer_idx in group:
                return group_idx
        raise ValueError(f"basis_groups[{name!r}] has no group holding layer {layer_idx}.")

    def validate_basis_sharing(self) -> None:
        """Checks groups, ranks and dense types; raises `ValueError` naming the offending field."""
        for field in ("basis_groups", "basis_ranks"):
            unknown = sorted(set(getattr(self, field)) - set(PROJECTIONS))
            if unknown:
                raise ValueError(f"{field} names unknown projection(s) {unknown}; expected names from {list(PROJECTIONS)}.")
        unknown = sorted(set(self.dense_projections) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"dense_projections names unknown projection(s) {unknown}; expected names from {list(PROJECTIONS)}.")
        both = sorted(set(self.dense_projections) & set(self.basis_groups))
        if both:
            raise ValueError(f"Projection(s) {both} are listed both in basis_groups and dense_projections.")
        neither = [name for name in PROJECTIONS if name not in self.basis_groups and name not in self.dense_projections]
        if neither:
            raise ValueError(f"Projection(s) {neither} are neither in basis_groups nor in dense_projections.")
        if set(self.basis_ranks) != set(self.basis_groups):
            raise ValueError(
                f"basis_ranks must give ranks for exactly the projections of basis_groups: "
                f"got {sorted(self.basis_ranks)} for groups {sorted(self.basis_groups)}."
            )
        num_layers = self.num_hidden_layers
        for name, groups in self.basis_groups.items():
            seen: dict[int, int] = {}
            for group_idx, group in enumerate(groups):
                if not group:
                    raise ValueError(f"basis_groups[{name!r}][{group_idx}] is empty.")
                for layer in group:
                    if not 0 <= layer < num_layers:
                        raise ValueError(
                            f"basis_groups[{name!r}][{group_idx}] names layer {layer}, but the model has {num_layers} layers."
                        )
                    if layer in seen:
                        raise ValueError(
                            f"basis_groups[{name!r}] groups {seen[layer]} and {group_idx} overlap: layer {layer} is in both."
                        )
                    seen[layer] = group_idx
            missing = sorted(set(range(num_layers)) - set(seen))
            if missing:
                raise ValueError(f"basis_groups[{name!r}] does not cover layer(s) {missing}.")
            ranks = self.basis_ranks[name]
            if len(ranks) != len(groups):
                raise ValueError(f"basis_ranks[{name!r}] has {len(ranks)} ranks for {len(groups)} groups.")
            d_in, d_out = self.projection_shape(name)
            for group_idx, (group, rank) in enumerate(zip(groups, ranks)):
                max_rank = min(d_in, len(group) * d_out)
                if not 1 <= rank <= max_rank:
                    raise ValueError(
                        f"basis_ranks[{name!r}][{group_idx}] = {rank} is out of range: a group of {len(group)} "
                        f"layer(s) with d_in={d_in}, d_out={d_out} allows ranks 1..{max_rank}."
                    )


__all__ = ["SharedBasisLlamaConfig", "check_basis_field_types", "PROJECTIONS", "ATTENTION_PROJECTIONS", "MLP_PROJECTIONS"]
