"""How the FLSL backbone's timm keys map onto mmsegmentation / mmdetection and detectron2
(ViTDet) ViT backbones, kept as data so that the code, the verification and docs/export.md
all read the same table.

Shape symbols: D = embed dim, P = patch size, N = patch tokens of the pretraining grid
((global_size / P) ** 2), `{i}` = block index 0 .. depth-1.

FLSL's backbone has no class token. Both frameworks keep a class-token slot in their
position-embedding table, so the export prepends a zero row there: mmseg's VisionTransformer
adds it to its (unused) class token that `with_cls_token=False` drops before the first layer,
and detectron2's `get_abs_pos` drops row 0 when `pretrain_use_cls_token=True` (its default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rule:
    """One row of a mapping. `how`: copy, cls_row (prepend a zero class-token row), zeros (a
    target-only tensor of zeros), drop (the target has no counterpart)."""

    source: str | None
    target: str | None
    source_shape: str | None
    target_shape: str | None
    how: str = "copy"
    note: str = ""


# (timm key inside blocks.{i}, mmseg key inside layers.{i}, shape)
_BLOCK_KEYS = (
    ("norm1.weight", "ln1.weight", "(D,)"),
    ("norm1.bias", "ln1.bias", "(D,)"),
    ("attn.qkv.weight", "attn.attn.in_proj_weight", "(3D, D)"),
    ("attn.qkv.bias", "attn.attn.in_proj_bias", "(3D,)"),
    ("attn.proj.weight", "attn.attn.out_proj.weight", "(D, D)"),
    ("attn.proj.bias", "attn.attn.out_proj.bias", "(D,)"),
    ("norm2.weight", "ln2.weight", "(D,)"),
    ("norm2.bias", "ln2.bias", "(D,)"),
    ("mlp.fc1.weight", "ffn.layers.0.0.weight", "(4D, D)"),
    ("mlp.fc1.bias", "ffn.layers.0.0.bias", "(4D,)"),
    ("mlp.fc2.weight", "ffn.layers.1.weight", "(D, 4D)"),
    ("mlp.fc2.bias", "ffn.layers.1.bias", "(D,)"),
)

MMSEG_RULES: tuple[Rule, ...] = (
    Rule("patch_embed.proj.weight", "patch_embed.projection.weight", "(D, 3, P, P)", "(D, 3, P, P)"),
    Rule("patch_embed.proj.bias", "patch_embed.projection.bias", "(D,)", "(D,)"),
    Rule("pos_embed", "pos_embed", "(1, N, D)", "(1, N+1, D)", "cls_row", "row 0 (class-token slot) is zeros"),
    Rule(None, "cls_token", None, "(1, 1, D)", "zeros", "zeros; dropped by `with_cls_token=False`"),
    *(Rule(f"blocks.{{i}}.{timm}", f"layers.{{i}}.{mm}", shape, shape) for timm, mm, shape in _BLOCK_KEYS),
    Rule("norm.weight", "ln1.weight", "(D,)", "(D,)", note="final norm: `final_norm=True`"),
    Rule("norm.bias", "ln1.bias", "(D,)", "(D,)", note="final norm: `final_norm=True`"),
)

_D2 = "backbone.net."
DETECTRON2_RULES: tuple[Rule, ...] = (
    Rule("patch_embed.proj.weight", f"{_D2}patch_embed.proj.weight", "(D, 3, P, P)", "(D, 3, P, P)"),
    Rule("patch_embed.proj.bias", f"{_D2}patch_embed.proj.bias", "(D,)", "(D,)"),
    Rule(
        "pos_embed",
        f"{_D2}pos_embed",
        "(1, N, D)",
        "(1, N+1, D)",
        "cls_row",
        "row 0 (class-token slot) is zeros: `pretrain_use_cls_token=True`",
    ),
    *(Rule(f"blocks.{{i}}.{timm}", f"{_D2}blocks.{{i}}.{timm}", shape, shape) for timm, _, shape in _BLOCK_KEYS),
    Rule("norm.weight", None, "(D,)", None, "drop", "ViTDet's ViT has no final norm"),
    Rule("norm.bias", None, "(D,)", None, "drop", "ViTDet's ViT has no final norm"),
)

RULES: dict[str, tuple[Rule, ...]] = {"mmseg": MMSEG_RULES, "mmdet": MMSEG_RULES, "detectron2": DETECTRON2_RULES}


def _pattern(key: str) -> re.Pattern:
    return re.compile(re.escape(key).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _match(key: str, rules: tuple[Rule, ...], *, side: str) -> tuple[Rule, str | None]:
    """The rule whose `side` ("source" or "target") pattern matches `key`, and the block index."""
    for rule in rules:
        pattern = getattr(rule, side)
        if pattern is None:
            continue
        found = _pattern(pattern).match(key)
        if found:
            return rule, found.groupdict().get("i")
    raise KeyError(key)


def _fill(pattern: str, index: str | None) -> str:
    return pattern.replace("{i}", index) if index is not None else pattern


def to_framework(state_dict: dict[str, torch.Tensor], *, framework: str) -> dict[str, torch.Tensor]:
    """The backbone's timm state dict renamed and reshaped for `framework`."""
    rules = RULES[framework]
    embed_dim = state_dict["pos_embed"].shape[-1]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        rule, index = _match(key, rules, side="source")  # KeyError: timm grew a key this table lacks
        if rule.how == "drop":
            continue
        assert rule.target is not None, "only a dropped key has no target"
        if rule.how == "cls_row":
            value = torch.cat([value.new_zeros(value.shape[0], 1, value.shape[2]), value], dim=1)
        out[_fill(rule.target, index)] = value.detach().clone().contiguous()
    for rule in rules:
        if rule.how == "zeros":
            assert rule.target is not None, "a zeros rule names its target"
            out[rule.target] = torch.zeros(1, 1, embed_dim)
    return out


def to_timm(state_dict: dict[str, torch.Tensor], *, framework: str) -> dict[str, torch.Tensor]:
    """The inverse of `to_framework` (keys with `how == "drop"` are absent)."""
    rules = RULES[framework]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        rule, index = _match(key, rules, side="target")
        if rule.how == "zeros":
            continue
        assert rule.source is not None, "only a zeros rule has no source"
        if rule.how == "cls_row":
            value = value[:, 1:]
        out[_fill(rule.source, index)] = value
    return out


def dropped_keys(*, framework: str) -> set[str]:
    """timm keys that `framework` has no place for."""
    return {rule.source for rule in RULES[framework] if rule.how == "drop" and rule.source is not None}


def _shape(text: str, symbols: dict[str, int]) -> tuple[int, ...]:
    """ "(3D, D)" -> (3 * D, D); terms are an integer, a symbol with an optional factor, or
    symbol+integer."""
    dims = []
    for term in text.strip("()").split(","):
        term = term.strip()
        if not term:
            continue
        found = re.fullmatch(r"(\d*)([A-Z]?)(?:\+(\d+))?", term)
        assert found and (found.group(1) or found.group(2)), f"bad shape term {term!r}"
        factor, symbol, offset = found.groups()
        if symbol:
            dims.append(int(factor or 1) * symbols[symbol] + int(offset or 0))
        else:
            dims.append(int(factor))
    return tuple(dims)


def expected_shapes(
    *, framework: str, depth: int, embed_dim: int, patch_size: int, tokens: int
) -> dict[str, tuple[int, ...]]:
    """Every key of a `framework` export and its shape, read from the mapping table."""
    symbols = {"D": embed_dim, "P": patch_size, "N": tokens}
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in RULES[framework]:
        if rule.target is None or rule.target_shape is None:
            continue
        indices = [str(i) for i in range(depth)] if "{i}" in rule.target else [None]
        for index in indices:
            shapes[_fill(rule.target, index)] = _shape(rule.target_shape, symbols)
    return shapes


def markdown_table(framework: str) -> str:
    """The mapping as the markdown table docs/export.md shows (a test keeps the two equal)."""
    lines = ["| flsl / timm key | shape | " + framework + " key | shape | note |", "|---|---|---|---|---|"]
    for rule in RULES[framework]:
        cells = [
            f"`{rule.source}`" if rule.source else "-",
            rule.source_shape or "-",
            f"`{rule.target}`" if rule.target else "-",
            rule.target_shape or "-",
            rule.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
