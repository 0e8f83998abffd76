"""The PixArt role table as the CLI uses it (from the family registry), for tests that call the passes directly."""

from graph_passes.linears import SiteSelection
from hn_export.families import role_table
from models.families import FAMILIES

PIXART_ROLES = role_table(FAMILIES["pixart-sigma"])
ALL_PIXART = SiteSelection(include=("",), roles=PIXART_ROLES)  # every linear; PixArt module paths get their roles
PIXART_BLOCKS = SiteSelection(roles=PIXART_ROLES)  # the default selection (linears inside transformer blocks)
