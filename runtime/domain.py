"""The custom operator domain of HadaNorm's online transforms.

Defined once here, where the device side lives, and imported by ``graph_passes`` which writes these ops.
"""

HADANORM_DOMAIN = "hadanorm"
HADANORM_OPSET_VERSION = 1
