"""The bridge between model families (`models.families`) and the model-agnostic graph passes.

`graph_family(model)`: the family of an ONNX graph, named in its metadata (``hn_export.family``, written by
`hn-export export`) or matched by its inputs.

`selection_for(model, selection)` fills the `SiteSelection`'s role table from the graph's family: the family named
in the graph's metadata or matched by its inputs; for graphs that match no family by inputs, the family whose role
rules name the most of the graph's linears. Where no rule names any block linear (module paths that cannot be
recovered, or an unknown model), every selected linear is still a site, with the generic role ``linear``, and a
warning says so.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from graph_passes.linears import SiteSelection, find_linears
from graph_passes.site_roles import RoleRule, RoleTable
from hn_export.metadata_keys import FAMILY_KEY
from models.families import FAMILIES, ModelFamily, family_of_inputs

logger = logging.getLogger(__name__)


def role_table(family: ModelFamily) -> RoleTable:
    """The graph-side role table of a family (its role rules as plain data)."""
    return RoleTable(family.name, family.block_lists, tuple(RoleRule(*rule) for rule in family.role_rules),
                     family.default_exclude)


def best_named(model: ir.Model, candidates: list[ModelFamily]) -> tuple[ModelFamily | None, int]:
    """The candidate whose role rules name the most of the graph's layers (the first on a tie), and how many."""
    paths = [linear.module_path for linear in find_linears(model)]
    scored = [(fam, sum(role_table(fam).site_of(p) is not None for p in paths)) for fam in candidates]
    return max(scored, key=lambda item: item[1]) if scored else (None, 0)


def graph_family(model: ir.Model) -> ModelFamily | None:
    """The family named in the graph's metadata, else the one whose inputs the graph has, else None. Where several
    families have the same input names (PixArt-Sigma and Sana; DiT and the UNet), the one whose role rules name the
    most of the graph's layers wins (registry order on a tie, e.g. module paths lost by the exporter)."""
    name = model.metadata_props.get(FAMILY_KEY)
    if name in FAMILIES:
        return FAMILIES[name]
    names = {v.name for v in model.graph.inputs if v.name}
    matches = [fam for fam in FAMILIES.values() if fam.matches_inputs(names)]
    if len(matches) <= 1:
        return matches[0] if matches else family_of_inputs(names)
    return best_named(model, matches)[0]


def roles_for(model: ir.Model) -> RoleTable | None:
    """The role table that names this graph's block linears, or None (generic roles, with a warning)."""
    family = graph_family(model)
    best, count = best_named(model, [family] if family is not None else list(FAMILIES.values()))
    if count:
        return role_table(best)
    what = f"the {family.name} family's" if family is not None else "any supported family's"
    logger.warning("no linear of this graph has a module path %s role rules name (module paths lost by its "
                   "exporter?): every selected linear (all of them unless --include is given) is quantized as its "
                   "own site with the generic role 'linear'", what)
    return None


def selection_for(model: ir.Model, selection: SiteSelection = SiteSelection()) -> SiteSelection:
    """`selection` with the role table of the graph's family filled in (kept when one is already set). Without
    ``--include`` the sites are the layers inside the family's blocks, less its `default_exclude` patterns."""
    if selection.roles is not None:
        return selection
    roles = roles_for(model)
    default = selection.include == SiteSelection().include
    if roles is None and default:
        # module paths lost: the default (the linears inside transformer blocks) cannot be recognised either
        return dataclasses.replace(selection, include=("",))
    if roles is not None and default:
        return dataclasses.replace(selection, roles=roles, include=roles.default_include(),
                                   exclude=tuple(selection.exclude) + roles.default_exclude)
    return dataclasses.replace(selection, roles=roles)
