"""Pass (a): find the activation sites and tag their MatMuls.

Each MatMul of a selected linear gets ``hadanorm.site = <site name>`` and ``hadanorm.role = main`` in its metadata;
later passes find their work through these tags, so they compose without sharing Python state.
"""

from __future__ import annotations

import onnx_ir as ir

from graph_passes import tags
from graph_passes.linears import SiteSelection, find_activation_sites


class TagSitesPass(ir.passes.InPlacePass):
    def __init__(self, selection: SiteSelection = SiteSelection()):
        super().__init__()
        self.selection = selection

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_activation_sites(model, self.selection)
        for site in sites:
            for linear in site.linears:
                linear.node.metadata_props[tags.SITE] = site.name
                linear.node.metadata_props[tags.ROLE] = tags.ROLE_MAIN
        return ir.passes.PassResult(model, modified=bool(sites))
