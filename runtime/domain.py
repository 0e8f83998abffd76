"""The custom operator domain of HadaNorm's online transforms and integer ops, and the model metadata keys the
device reads.

The keys are defined once, here, where they are read (`hn_export` writes them, `hn_export.metadata_keys`). The
domain is declared again by `graph_passes.domain` for what the passes write (the two packages import neither from
the other; tests/test_import_guards.py checks that the two agree).
"""

HADANORM_DOMAIN = "hadanorm"
HADANORM_OPSET_VERSION = 1
TRANSFORM_OPS_KEY = "hn_export.transform_ops"  # model metadata: comma list of hadanorm op types the graph uses
FORMAT_KEY = "hn_export.format"  # model metadata: qdq, nbits or fused (graph_passes.quantization.OutputFormat)
ATTENTION_KEY = "hn_export.attention"  # model metadata: precision of the fused hadanorm::Attention ops, or "none"
PROMPT_GRAPH_KEY = "hn_export.prompt_graph"  # a step graph's metadata: file name of its prompt graph, beside it
SPLIT_ID_KEY = "hn_export.split_id"  # both files of a split: the same mark (graph_passes.prompt_split.split_id_of)
CARRIED_KEY = "hn_export.carried"  # a step graph's metadata: comma list of the values its prompt graph hands over
