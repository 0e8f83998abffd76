"""Node metadata keys that carry the site plan from one pass to the next."""

SITE = "hadanorm.site"  # on a site's MatMuls and transform op: the site name
ROLE = "hadanorm.role"  # on MatMuls: one of the values below
ROLE_MAIN = "main"  # the site's own linear
ROLE_BIAS_CORRECTION = "bias-correction"  # mean token times the fused weight (float-token and exact modes)
BIAS_CORRECTION = "hadanorm.bias_correction"  # on MatMuls of centered sites: the BiasCorrection value


def site_of(node) -> str | None:
    return node.metadata_props.get(SITE)


def role_of(node) -> str | None:
    return node.metadata_props.get(ROLE)
