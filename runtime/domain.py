"""The custom operator domain of HadaNorm's online transforms and integer ops, and the model metadata keys.

Defined once here, where the device side lives; ``graph_passes`` writes these ops and keys.
"""

HADANORM_DOMAIN = "hadanorm"
HADANORM_OPSET_VERSION = 1
TRANSFORM_OPS_KEY = "hn_export.transform_ops"  # model metadata: comma list of hadanorm op types the graph uses
FORMAT_KEY = "hn_export.format"  # model metadata: qdq, nbits or fused (graph_passes.quantization.OutputFormat)
ATTENTION_KEY = "hn_export.attention"  # model metadata: precision of the fused hadanorm::Attention ops, or "none"
