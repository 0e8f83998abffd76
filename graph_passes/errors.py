"""The error graph passes raise for input they cannot handle (unsupported width, no linears, ...).

The message names the problem and the fix in one line; the CLI prints it and exits with code 2.
"""


class GraphInputError(ValueError):
    """The graph or an option cannot be handled; the message says why and what to do instead."""


def from_pass_error(exc: BaseException) -> GraphInputError:
    """The one-line error behind an exception raised by an onnx-ir pass or pass manager (which wrap the cause in
    ``PassError``): the `GraphInputError` a pass raised, else one naming the innermost cause."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for item in chain:
        if isinstance(item, GraphInputError):
            return item
    inner = chain[-1]
    text = " ".join(str(inner).split())[:300] or type(inner).__name__
    return GraphInputError(f"the graph cannot be rewritten ({type(inner).__name__}: {text}); check it with "
                           "onnx.checker, or re-export it with `hn-export export`")
