"""List the linear layers of an exported graph and group them into activation sites.

A linear ``y = x W^T + b`` appears in a torch export as ``MatMul(x, Wt)`` with ``Wt`` a constant ``[in, out]``
initializer (stored pre-transposed) and an optional ``Add(., b)`` with a constant ``[out]`` bias, or as
``Gemm(x, W, b, transB=1)``. The module path of a linear (`module_path_of`) comes from, in this order:

- the node's ``namespace`` metadata (the dynamo exporter, whose weights have generated names:
  ``.../transformer.transformer_blocks.0.attn1.to_q: torch.nn.modules.linear.Linear/...``);
- the node's scoped name (torch's TorchScript exporter, ``dynamo=False``, as optimum uses it; no metadata, weights
  named ``onnx::MatMul_123``): ``/transformer/transformer_blocks.0/attn1/to_q/MatMul`` is the op ``MatMul`` of module
  ``transformer.transformer_blocks.0.attn1.to_q``;
- the weight's name when it is a parameter name (``transformer.adaln_single.linear.weight``);
- else the node name as it is (then no role rule names the linear: it gets the generic role).

A 2-D convolution ``Conv(x, W[out, in, kh, kw], b)`` with a constant weight is listed too (``kind`` ``conv``): it is
a linear on every pixel's channel vector, applied at each kernel tap, so the same channel transforms apply to it
(`graph_passes.conv_sites`). Grouped (e.g. depthwise) convolutions mix no channels across groups the way a rotation
needs: they are never sites (an ``--include`` that names one is an error).

An *activation site* is one activation tensor together with the linears of one module group that consume it
(q/k/v of self-attention share one site, k/v of cross-attention another). The groups and their roles come from the
model family's `graph_passes.site_roles.RoleTable` in the `SiteSelection`; this module only reads the graph. Linears
of different blocks that read the same tensor (every PixArt block's cross-attention k/v reads the projected caption)
form separate sites, so each gets its own transform.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from graph_passes.errors import GraphInputError
from graph_passes.site_roles import GENERIC_ROLE, RoleTable

logger = logging.getLogger(__name__)

_LAYER_CLASSES = ("torch.nn.modules.linear.Linear", "torch.nn.modules.conv.Conv2d")


@dataclasses.dataclass
class LinearLayer:
    """One linear layer of the graph."""

    module_path: str
    node: ir.Node  # the MatMul (or Gemm)
    weight: ir.Value  # constant initializer; [in, out] for MatMul, [out, in] for Gemm(transB=1)
    bias: ir.Value | None
    bias_add: ir.Node | None  # the Add that applies the bias after a MatMul
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()  # convolutions: the kernel size (kh, kw)
    group: int = 1  # convolutions: the ``group`` attribute

    @property
    def activation(self) -> ir.Value:
        value = self.node.inputs[0]
        assert value is not None
        return value

    @property
    def is_matmul(self) -> bool:
        return self.node.op_type == "MatMul"

    @property
    def is_conv(self) -> bool:
        return self.node.op_type == "Conv"

    @property
    def is_pointwise(self) -> bool:
        """A 1x1 convolution with unit strides and no padding: exactly a linear on each pixel."""
        return self.is_conv and is_pointwise_conv(self.node)

    @property
    def kind(self) -> str:
        """``linear`` or ``conv KxK`` (``layers`` prints it)."""
        return f"conv {'x'.join(map(str, self.kernel))}" + (f" group {self.group}" if self.group != 1 else "") \
            if self.is_conv else "linear"


@dataclasses.dataclass
class ActivationSite:
    """An activation tensor and the linears (of one module group) that consume it."""

    name: str  # e.g. "transformer_blocks.3.attn1.qkv"
    role: str  # e.g. "self-attn in"; "linear" where the role table names no role
    block: int | None
    activation: ir.Value
    linears: list[LinearLayer]

    @property
    def width(self) -> int:
        return self.linears[0].in_features

    @property
    def is_conv(self) -> bool:
        """The site's layers are convolutions reading ``[B, C, H, W]`` (channels on axis 1, pixels as tokens)."""
        return self.linears[0].is_conv

    @property
    def can_center(self) -> bool:
        """Centering ``x - mu`` is exact: linears and 1x1 convs (``W mu`` is then the same for every pixel). A k x k
        conv with zero padding sees ``mu`` at interior pixels but zeros at the border: not centered (its site keeps
        the method's scale and rotation only)."""
        return all(linear.is_matmul or linear.is_pointwise for linear in self.linears)


@dataclasses.dataclass(frozen=True)
class SiteSelection:
    """Which linears become activation sites: module-path regexes (searched, not anchored), and the role table of
    the model's family that names the sites (None: every site has the generic role ``linear``)."""

    include: tuple[str, ...] = (r"transformer_blocks\.",)
    exclude: tuple[str, ...] = ()
    roles: RoleTable | None = None
    explicit: bool = False  # `include` came from the user: a grouped conv it matches is an error, not skipped
    # also every linear (MatMul / Gemm, not conv) outside the family's blocks: caption projection, timestep
    # embedder, adaLN-single, final projection, ... (`--every-linear`; their bits are QuantConfig.outer_bits)
    outer_linears: bool = False

    def __post_init__(self) -> None:
        for option, patterns in (("--include", self.include), ("--exclude", self.exclude)):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as exc:
                    raise GraphInputError(f"{option} {pattern!r} is not a valid regular expression ({exc}); escape "
                                          r"special characters, e.g. --include 'attn1\.to_q'") from None

    def _excluded(self, module_path: str) -> bool:
        return any(re.search(p, module_path) for p in self.exclude)

    def selects(self, module_path: str) -> bool:
        return any(re.search(p, module_path) for p in self.include) and not self._excluded(module_path)

    def selects_layer(self, linear: "LinearLayer") -> bool:
        """`selects` its module path, or (`outer_linears`) a linear outside the blocks that --exclude leaves."""
        if self.selects(linear.module_path):
            return True
        return (self.outer_linears and linear.is_matmul and self.roles is not None
                and self.roles.block_of(linear.module_path) is None and not self._excluded(linear.module_path))


def is_pointwise_conv(conv: ir.Node) -> bool:
    """A Conv with a 1x1 kernel, unit strides, no padding and one group: exactly a linear on each pixel."""
    weight = conv.inputs[1].const_value if len(conv.inputs) > 1 and conv.inputs[1] is not None else None
    attrs = conv.attributes
    strides = attrs["strides"].as_ints() if "strides" in attrs else ()
    pads = attrs["pads"].as_ints() if "pads" in attrs else ()
    auto_pad = attrs["auto_pad"].as_string() if "auto_pad" in attrs else "NOTSET"
    return (weight is not None and tuple(weight.shape[2:]) == (1, 1) and all(s == 1 for s in strides)
            and not any(pads) and auto_pad in ("NOTSET", "VALID") and attrs.get_int("group", 1) == 1)


def _namespace_path(node: ir.Node) -> str:
    """The innermost ``torch.nn.Linear`` module named in the dynamo exporter's ``namespace`` metadata."""
    path = ""
    for part in node.metadata_props.get("namespace", "").split("/"):
        name, _, cls = part.partition(": ")
        if cls.strip() in _LAYER_CLASSES:
            path = name.strip()
    return path


def _scope_path(name: str) -> str:
    """``/transformer/transformer_blocks.0/attn1/to_q/MatMul`` -> ``transformer.transformer_blocks.0.attn1.to_q``:
    the TorchScript exporter's node name is the module scope, then the op's own name."""
    if not name.startswith("/"):
        return ""
    scope = [part for part in name[1:].split("/")[:-1] if part]
    return ".".join(scope)


def _weight_path(node: ir.Node) -> str:
    """``transformer.adaln_single.linear.weight`` -> ``transformer.adaln_single.linear`` (parameter-named weights).
    A weight read by several nodes (tied weights) names none of them."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or len(list(weight.uses())) != 1:
        return ""
    name = weight.name or ""
    return name.removesuffix(".weight") if name.endswith(".weight") and not name.startswith("onnx::") else ""


def module_path_of(node: ir.Node) -> str:
    """The module path of a linear: namespace metadata, scoped node name, parameter-named weight, or the node name."""
    return _namespace_path(node) or _scope_path(node.name or "") or _weight_path(node) or (node.name or "")


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value


def _bias_add(matmul: ir.Node, out_features: int) -> tuple[ir.Node | None, ir.Value | None]:
    consumers = list(matmul.outputs[0].uses())
    if len(consumers) != 1:
        return None, None
    add, _ = consumers[0]
    if add.op_type != "Add":
        return None, None
    for value in add.inputs:
        tensor = _constant(value)
        if tensor is not None and tuple(tensor.shape) == (out_features,):
            return add, value
    return None, None


def find_linears(model: ir.Model) -> list[LinearLayer]:
    """All linear layers of the main graph, in graph order."""
    linears: list[LinearLayer] = []
    for node in model.graph:
        if node.op_type == "MatMul" and node.domain == "":
            weight = node.inputs[1]
            tensor = _constant(weight)
            if tensor is None or len(tensor.shape) != 2:
                continue
            in_f, out_f = (int(d) for d in tensor.shape)
            add, bias = _bias_add(node, out_f)
            path = module_path_of(node) or weight.name or ""
            linears.append(LinearLayer(path, node, weight, bias, add, in_f, out_f))
        elif node.op_type == "Gemm" and node.domain == "":
            attrs = node.attributes
            trans_b = attrs["transB"].as_int() if "transB" in attrs else 0
            tensor = _constant(node.inputs[1])
            if tensor is None or len(tensor.shape) != 2:
                continue
            out_f, in_f = (int(d) for d in tensor.shape) if trans_b else reversed([int(d) for d in tensor.shape])
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            path = module_path_of(node) or node.inputs[1].name or ""
            linears.append(LinearLayer(path, node, node.inputs[1], bias, None, in_f, out_f))
        elif node.op_type == "Conv" and node.domain == "":
            tensor = _constant(node.inputs[1])
            if tensor is None or len(tensor.shape) != 4:  # 2-D convolutions only
                continue
            group = node.attributes.get_int("group", 1)
            out_f, in_per_group = int(tensor.shape[0]), int(tensor.shape[1])
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            path = module_path_of(node) or node.inputs[1].name or ""
            linears.append(LinearLayer(path, node, node.inputs[1], bias, None, in_per_group * group, out_f,
                                       tuple(int(k) for k in tensor.shape[2:]), group))
    return linears


def _group_and_role(module_path: str, roles: RoleTable | None) -> tuple[str | None, str, int | None]:
    """Block linears named by the role table get their site group; others group by activation alone (group None)."""
    named = roles.site_of(module_path) if roles is not None else None
    if named is not None:
        return named.group, named.role, named.block
    located = roles.block_of(module_path) if roles is not None else None
    return None, GENERIC_ROLE, located[1] if located else None


def find_activation_sites(model: ir.Model, selection: SiteSelection = SiteSelection()) -> list[ActivationSite]:
    """Group the selected MatMul linears and ungrouped convolutions by (activation tensor, module group).

    Raises GraphInputError when the graph has no linear layer, the selection matches none, or an explicit
    ``--include`` names a grouped convolution.
    """
    linears = find_linears(model)
    if not linears:
        raise GraphInputError(
            "the model has no linear layers (MatMul or Gemm with a constant 2-D weight); "
            "pass a transformer exported with `hn-export export`"
        )
    sites: dict[tuple[str, str, bool], ActivationSite] = {}
    for linear in linears:
        if not (linear.is_matmul or linear.is_conv) or not selection.selects_layer(linear):
            continue
        if linear.group != 1:
            if selection.explicit:
                raise GraphInputError(
                    f"{linear.module_path} is a grouped convolution (group {linear.group}): a channel scale or "
                    "rotation does not commute with it, so it cannot be an activation site; leave it out with "
                    f"--exclude '{re.escape(linear.module_path.rsplit('.', 1)[-1])}$'")
            logger.info("%s: grouped convolution (group %d), not a site", linear.module_path, linear.group)
            continue
        group, role, block = _group_and_role(linear.module_path, selection.roles)
        key = (linear.activation.name or "", group or "", linear.is_conv)
        if key not in sites:
            sites[key] = ActivationSite(group or linear.module_path, role, block, linear.activation, [])
        sites[key].linears.append(linear)
    if not sites:
        raise GraphInputError(
            f"no linear layer matches --include {list(selection.include)} / --exclude {list(selection.exclude)}; "
            "list the layers with `hn-export layers MODEL.onnx` and adjust the patterns"
        )
    _make_names_unique(sites.values())
    return list(sites.values())


def _make_names_unique(sites: Iterable[ActivationSite]) -> None:
    seen: dict[str, int] = {}
    for site in sites:
        count = seen.get(site.name, 0)
        seen[site.name] = count + 1
        if count:
            site.name = f"{site.name}#{count}"
