"""The model metadata keys hn-export writes (``metadata_props`` of the ONNX files), each spelled once.

The keys the device reads (`runtime.session`, `runtime.denoiser`) have their home where they are read,
`runtime.domain`, and are re-exported here so that every writer imports its keys from one module.
"""

from runtime.domain import (  # noqa: F401  (read on the device)
    ATTENTION_KEY, CARRIED_KEY, FORMAT_KEY, PROMPT_GRAPH_KEY, SPLIT_ID_KEY, TRANSFORM_OPS_KEY,
)

# `hn-export export` (and the bundle's per-size transformers)
FAMILY_KEY = "hn_export.family"  # the model family (`hn_export.families.graph_family` reads it back)
VERSION_KEY = "hn_export.version"
SOURCE_KEY = "hn_export.source"  # preset / checkpoint / config the weights came from
DTYPE_KEY = "hn_export.dtype"  # float32 or float16
TORCH_KEY = "hn_export.torch"  # torch version of the export
SIZE_KEY = "hn_export.size"  # a bundle transformer's image size, WxH pixels

# the quantize job (`hn_export.quantize_job`); METHOD_KEY also marks a graph as already quantized
METHOD_KEY = "hn_export.method"
BITS_KEY = "hn_export.bits"  # e.g. w4a4, or float (transform only)
ACT_GRANULARITY_KEY = "hn_export.act_granularity"
BIAS_CORRECTION_KEY = "hn_export.bias_correction"
WEIGHT_RANGE_KEY = "hn_export.weight_range"  # minmax, mse, gptq, gptq-act-order
WEIGHT_SCALES_KEY = "hn_export.weight_scales"  # block, two-level
LOW_RANK_KEY = "hn_export.low_rank"  # rank of the float branch beside each quantized weight (0: none)
ALPHA_KEY = "hn_export.alpha"  # --alpha auto: JSON {site name: chosen alpha} (a number given: not written)
SESSION_CONFIG_KEY = "hn_export.onnxruntime_session_config"  # a note: the session options the graph needs

# the bundle's other components (`hn_export.bundle_components`)
ROLE_KEY = "hn_export.role"  # text_encoder or vae_decoder
WEIGHT_BITS_KEY = "hn_export.weight_bits"  # weight-only bits of the text encoder
