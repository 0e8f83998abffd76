"""The one checker of a user's named-array file (``--calib FILE.npz``, ``--inputs FILE.npz``) against the graph's input
signature, used by every command that reads one (quantize, compare, sensitivity, diff).

A file passes when it is a regular, readable ``.npz`` of plain arrays (no pickled objects) holding every graph input,
and for each input: a numeric dtype of the input's kind (float inputs take float or integer arrays; integer inputs
take integers, or floats holding whole numbers), the input's rank, every static dimension of the graph (latent size,
caption width, a static caption length or batch, Flux's id width), no empty axis, finite values; the batched inputs
(axis 0 = samples) all have the same number of rows, at least one (with a static batch: a multiple of it); an
attention mask as long as the caption; then the family's own value checks (e.g. DiT class labels in range).
Anything else is one `UserError` line naming the array and what the graph takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hn_export.errors import UserError
from models.errors import ModelInputError
from models.families import FAMILIES, Signature


def _shape_text(sig: Signature, name: str) -> str:
    dims = ["?" if d is None else str(d) for d in sig.shapes[name]]
    if name in sig.batched and dims and dims[0] == "?":
        dims[0] = "N"
    return f"[{', '.join(dims)}]"


def load_input_file(path, sig: Signature, what: str, single_call: bool = False) -> dict[str, np.ndarray]:
    """The graph inputs of `path`, checked against `sig` (see the module text). `single_call`: the rows are fed as
    one call (diff), so a static batch must be matched exactly."""
    path = Path(path)
    needed = list(sig.shapes)  # every graph input
    fix_save = f"save it with numpy.savez({', '.join(n + '=...' for n in needed)})"
    if not path.exists():
        raise UserError(f"{what} {path} does not exist", "check the path")
    if not path.is_file():
        raise UserError(f"{what} {path} is not a regular file", fix_save)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: np.asarray(npz[key]) for key in npz.files}
    except Exception:
        raise UserError(f"{what} {path} is not a readable .npz of plain arrays", fix_save) from None
    missing = [k for k in needed if k not in data]
    if missing:
        raise UserError(f"{what} {path} lacks arrays {missing}", f"it must hold {needed}")
    rows: dict[str, int] = {}
    for name in needed:
        array = data[name]
        want = sig.shapes[name]
        dtype = sig.dtypes.get(name)
        takes = f"the model takes {_shape_text(sig, name)}"
        if array.dtype.kind not in "biuf":
            raise UserError(f"{what} {path}: {name} has dtype {array.dtype}, not numbers",
                            f"store numbers ({'float' if dtype is None or dtype.kind == 'f' else 'int64'})")
        if dtype is not None and dtype.kind in "iu":
            if array.dtype.kind == "f" and not (np.all(np.isfinite(array)) and np.all(array == np.round(array))):
                raise UserError(f"{what} {path}: {name} holds values that are not whole numbers",
                                f"store it as {dtype.name}")
        if array.ndim != len(want):
            raise UserError(f"{what} {path}: {name} has shape {array.shape} (rank {array.ndim}); {takes}",
                            "pass arrays of this model's shapes")
        if 0 in array.shape:
            raise UserError(f"{what} {path}: {name} has shape {array.shape}, an empty axis",
                            "pass at least one sample")
        batched = name in sig.batched
        for axis, (got, dim) in enumerate(zip(array.shape, want)):
            if batched and axis == 0:
                continue
            if dim is not None and got != dim:
                raise UserError(f"{what} {path}: {name} has shape {array.shape}; {takes}",
                                "pass arrays of this model's shapes (one file per resolution)")
        if batched:
            rows[name] = int(array.shape[0])
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise UserError(f"{what} {path}: input {name} contains NaN or inf", "pass finite inputs")
    if len(set(rows.values())) > 1:
        raise UserError(f"{what} {path}: arrays have different sample counts {rows}",
                        "give every array the same first axis")
    count = next(iter(rows.values()), None)
    batch = next((sig.shapes[n][0] for n in rows if sig.shapes[n][0] is not None), None)
    if count is not None and batch is not None and (count != batch if single_call else count % batch):
        raise UserError(f"{what} {path} holds {count} rows; the model's batch is fixed at {batch}",
                        f"pass {batch if single_call else 'a multiple of ' + str(batch)} rows")
    seen: dict[str, tuple[str, int, int]] = {}  # symbol -> (input, axis, size): axes of one symbol agree
    for name, dims in getattr(sig, "symbols", ()):
        for axis, symbol in enumerate(dims):
            if symbol is None or (axis == 0 and name in sig.batched) or axis >= data[name].ndim:
                continue
            size = int(data[name].shape[axis])
            other = seen.setdefault(symbol, (name, axis, size))
            if other[2] != size:
                raise UserError(f"{what} {path}: {name} has {size} on axis {axis}, {other[0]} {other[2]} on axis "
                                f"{other[1]}; the graph gives both the size {symbol}", "make them equal")
    text, mask = data.get("encoder_hidden_states"), data.get("encoder_attention_mask")
    if "encoder_attention_mask" in needed and "encoder_hidden_states" in needed and mask.shape[1] != text.shape[1]:
        raise UserError(f"{what} {path}: encoder_attention_mask has caption length {mask.shape[1]}, "
                        f"encoder_hidden_states {text.shape[1]}", "give them the same caption length")
    if sig.family in FAMILIES:
        try:
            FAMILIES[sig.family].check_input_arrays(sig, data)
        except ModelInputError as exc:
            raise UserError(f"{what} {path}: {exc.problem}", exc.fix) from None
    return {k: data[k] for k in needed}


def call_rows(sig: Signature, default: int = 2) -> int:
    """Rows per call when a file's samples are run a few at a time: the graph's static batch, else `default`."""
    return next((sig.shapes[n][0] for n in sig.batched if sig.shapes[n] and sig.shapes[n][0] is not None), default)


def check_same_inputs(sig: Signature, other: Signature, what: str) -> None:
    """`other` (a reference graph) takes the same inputs as `sig` (names, ranks, static sizes)."""
    if set(sig.shapes) != set(other.shapes):
        raise UserError(f"the {what} takes inputs {sorted(other.shapes)}, the model {sorted(sig.shapes)}",
                        f"pass a {what} exported from the same model")
    for name, shape in sig.shapes.items():
        theirs = other.shapes[name]
        if len(shape) != len(theirs) or any(a is not None and b is not None and a != b for a, b in zip(shape, theirs)):
            raise UserError(f"the {what}'s input {name} has shape {list(theirs)}, the model's {list(shape)}",
                            "compare graphs exported at the same resolution")
