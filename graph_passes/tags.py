"""Node metadata keys that carry the site plan from one pass to the next."""

SITE = "hadanorm.site"  # on a site's MatMuls and transform op: the site name
ROLE = "hadanorm.role"  # on MatMuls: one of the values below
ROLE_MAIN = "main"  # the site's own linear
ROLE_BIAS_CORRECTION = "bias-correction"  # mean token times the fused weight (float-token and exact modes)
BIAS_CORRECTION = "hadanorm.bias_correction"  # on MatMuls of centered sites: the BiasCorrection value
WEIGHT_ROLE = "hadanorm.weight"  # on weight DequantizeLinear nodes: ROLE_MAIN or ROLE_BIAS_CORRECTION
ACT_QUANT = "hadanorm.act_quant"  # on every node of a per-token activation quantizer: the site name
ACT_BITS = "hadanorm.act_bits"  # on the activation quantizer's DequantizeLinear: its bit width
ACT_STATIC = "hadanorm.act_static"  # on a static per-tensor quantizer's DequantizeLinear: its bit width
CONV_VIEW = "hadanorm.conv_view"  # on the Reshape that turns a conv site's tokens back into [B, H, W, C]: the site
ROTATE_BACK = "hadanorm.rotate_back"  # on the single-Hadamard (HQ-DM) back rotation after the quantizer: the site


def site_of(node) -> str | None:
    return node.metadata_props.get(SITE)


def role_of(node) -> str | None:
    return node.metadata_props.get(ROLE)
