"""Role tables: how the module paths of a model family's block linears name activation sites and their roles.

`graph_passes` knows no model family. A family (see `models.families`) hands a `RoleTable` down as plain data; the
passes find linears and activation tensors from the graph structure and use the table only to *name* them:

- a module path such as ``transformer.transformer_blocks.3.attn1.to_k`` is split into a block list
  (``transformer_blocks``), a block index (3) and the path inside the block (``attn1.to_k``);
- a `RoleRule` for that inner path gives the site group (``attn1.qkv``: linears of one group that read the same
  tensor are one site) and the role printed by ``hn-export layers`` (``self-attn in``).

A linear that no rule matches keeps the generic role ``linear`` and groups by its activation tensor alone.
"""

from __future__ import annotations

import dataclasses
import re

GENERIC_ROLE = "linear"


@dataclasses.dataclass(frozen=True)
class RoleRule:
    """One linear inside a block: its path in the block, its site group and the group's role."""

    suffix: str  # e.g. "attn1.to_q"
    group: str  # e.g. "attn1.qkv"
    role: str  # e.g. "self-attn in"
    block_list: str | None = None  # only in this block list (e.g. "single_transformer_blocks"); None = any


@dataclasses.dataclass(frozen=True)
class SiteName:
    """Where a matched linear belongs: its site group name, role and block."""

    group: str  # e.g. "transformer_blocks.3.attn1.qkv"
    role: str
    block: int | None  # None in a block list that is one module (a UNet's mid_block)


@dataclasses.dataclass(frozen=True)
class RoleTable:
    """The block lists and role rules of one model family."""

    family: str
    block_lists: tuple[str, ...]
    rules: tuple[RoleRule, ...]
    default_exclude: tuple[str, ...] = ()  # patterns left in float unless the user's --include names them

    def __post_init__(self) -> None:
        lists = "|".join(re.escape(b) for b in sorted(self.block_lists, key=len, reverse=True))
        object.__setattr__(self, "_pattern", re.compile(rf"(?:^|[./])({lists})(?:[./](\d+))?[./](.+)$"))

    @property
    def roles(self) -> tuple[str, ...]:
        """Role names in table order, each once."""
        return tuple(dict.fromkeys(rule.role for rule in self.rules))

    def block_of(self, module_path: str) -> tuple[str, int | None, str] | None:
        """(block list, block index, path inside the block) of a module path, or None outside the blocks. A block
        list that is a single module (a UNet's ``mid_block``) has index None."""
        match = self._pattern.search(module_path)  # type: ignore[attr-defined]
        if match is None:
            return None
        index = int(match.group(2)) if match.group(2) is not None else None
        return match.group(1), index, match.group(3).replace("/", ".")

    def site_of(self, module_path: str) -> SiteName | None:
        """The site group and role of a block linear, or None when no rule names it."""
        located = self.block_of(module_path)
        if located is None:
            return None
        block_list, index, inner = located
        for rule in self.rules:
            if rule.suffix == inner and rule.block_list in (None, block_list):
                prefix = block_list if index is None else f"{block_list}.{index}"
                return SiteName(f"{prefix}.{rule.group}", rule.role, index)
        return None

    def default_include(self) -> tuple[str, ...]:
        """Module-path patterns of the linears inside the blocks (the default site selection)."""
        return tuple(rf"(^|[./]){re.escape(b)}[./]" for b in self.block_lists)
