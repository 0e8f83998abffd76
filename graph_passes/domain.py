"""The custom op domain graph_passes writes, and the ONNX opset of everything it writes.

The device side (`runtime.domain`) declares the same domain for what it runs; `graph_passes` and `runtime` are
sibling packages and import neither from the other (tests/test_import_guards.py checks that the two agree). The
model metadata keys are not written here: `hn_export` writes them (`hn_export.metadata_keys`), the ones the device
reads from their home in `runtime.domain`.
"""

HADANORM_DOMAIN = "hadanorm"
HADANORM_OPSET_VERSION = 1
ONNX_OPSET = 21  # the default-domain opset the passes write (blocked QuantizeLinear) and function bodies import
