"""The custom op domain and model metadata keys graph_passes writes.

The device side (`runtime.domain`) declares the same names for what it reads; `graph_passes` and `runtime` are
sibling packages and import neither from the other (tests/test_import_guards.py checks that the two agree).
"""

HADANORM_DOMAIN = "hadanorm"
HADANORM_OPSET_VERSION = 1
TRANSFORM_OPS_KEY = "hn_export.transform_ops"  # model metadata: comma list of hadanorm op types the graph uses
FORMAT_KEY = "hn_export.format"  # model metadata: qdq, nbits or fused (graph_passes.quantization.OutputFormat)
ATTENTION_KEY = "hn_export.attention"  # model metadata: precision of the fused hadanorm::Attention ops, or "none"
