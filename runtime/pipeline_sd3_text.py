"""Stable Diffusion 3's prompt encoding on the device (``StableDiffusion3Pipeline.encode_prompt`` in numpy): two CLIP
encoders and T5, from a bundle's ``text_encoder{,_2,_3}.onnx`` and ``tokenizer{,_2,_3}.json``.

Per prompt, as diffusers does it (``clip_skip`` None, one image per prompt):

- each CLIP tokenizer pads to its ``max_length`` (77) with its own pad id (CLIP-L's ``<|endoftext|>``, CLIP-G's
  ``!``), truncating longer prompts with ``<|endoftext|>`` kept last; its encoder (no attention mask) gives the
  penultimate layer's hidden states [1, 77, h] and the pooled projection [1, p];
- T5 pads to ``max_sequence_length`` (256) with the pad id and runs with an all-ones mask (diffusers passes none);
- ``prompt_embeds`` = concat(CLIP-L, CLIP-G hidden states on channels, zero-padded to T5's width) then T5's tokens:
  [1, 77 + 256, W]; ``pooled_projections`` = concat(pooled CLIP-L, pooled CLIP-G): [1, p_l + p_g].

Each encoder's session is created, run on every prompt and freed before the next (never two held at once).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle_manifest import Manifest
from runtime.errors import RuntimeInputError

logger = logging.getLogger(__name__)

CLIP_ROLES = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5_ROLES = ("text_encoder_3", "tokenizer_3")


@dataclasses.dataclass(frozen=True)
class SD3Text:
    embeddings: np.ndarray  # [1, clip_length + max_sequence_length, width] float32
    pooled: np.ndarray  # [1, pooled width] float32
    truncated: str | None  # the text a tokenizer cut off (the longest cut), or None


class PaddedTokenizer:
    """A ``tokenizers`` file that truncates to `length` tokens (special tokens kept) and pads to exactly `length`."""

    def __init__(self, path: Path, length: int, pad_id: int, what: str):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception for a bad file
            raise RuntimeInputError(f"bundle tokenizer {path.name} cannot be read ({str(exc)[:200]}); rebuild the "
                                    "bundle with `hn-export bundle`") from None
        self.tokenizer.no_padding()
        self.untruncated = Tokenizer.from_str(self.tokenizer.to_str())
        self.untruncated.no_truncation()
        self.tokenizer.enable_truncation(length)
        self.length, self.pad_id, self.what = length, pad_id, what

    def __call__(self, text: str) -> tuple[np.ndarray, str | None]:
        """[1, length] int64 ids and the text truncation cut off (None if none), as diffusers warns."""
        encoding = self.tokenizer.encode(text)
        removed = None
        if encoding.overflowing:
            full = self.untruncated.encode(text).ids
            # CLIP's byte-level BPE marks word ends with </w> (its file's decoder keeps them)
            removed = " ".join(self.untruncated.decode(full[self.length - 1:-1]).replace("</w>", " ").split())
            logger.warning("The following part of your input was truncated because %s can only handle sequences up "
                           "to %d tokens: %s", self.what, self.length, removed)
        ids = np.full((1, self.length), self.pad_id, dtype=np.int64)
        ids[0, :len(encoding.ids)] = encoding.ids
        return ids, removed


def _run_each(make_session: Callable[[Path], Any], path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> list:
    session = make_session(path)
    try:
        types = {i.name: i.type for i in session.get_inputs()}
        out = []
        for feed in feeds:
            feed = {k: v.astype(np.int32 if types.get(k) == "tensor(int32)" else np.int64) for k, v in feed.items()
                    if k in types}
            out.append([np.asarray(o, dtype=np.float32) for o in session.run(None, feed)])
        return out
    finally:
        del session
        gc.collect()


def encode_sd3(manifest: Manifest, make_session: Callable[[Path], Any], texts: Sequence[str]) -> list[SD3Text]:
    """Each text's SD3 conditioning (module docstring); `make_session(path)` creates an onnxruntime session."""
    text = manifest.text
    clip_settings = text.get("clip")
    if not isinstance(clip_settings, list) or len(clip_settings) != 2:
        raise RuntimeInputError(f"bundle {manifest.folder}: bundle.json's text.clip does not describe two CLIP "
                                "tokenizers; rebuild it with `hn-export bundle`")
    width = int(text["width"])
    hidden, pooled, cut = [[] for _ in texts], [[] for _ in texts], [[] for _ in texts]
    for (encoder_role, tokenizer_role), settings in zip(CLIP_ROLES, clip_settings):
        tokenizer = PaddedTokenizer(manifest.path(tokenizer_role), int(settings["max_length"]),
                                    int(settings["pad_token_id"]), "CLIP")
        tokens = [tokenizer(t) for t in texts]
        outs = _run_each(make_session, manifest.path(encoder_role), [{"input_ids": ids} for ids, _ in tokens])
        for i, ((_, removed), (states, embeds)) in enumerate(zip(tokens, outs)):
            hidden[i].append(states)
            pooled[i].append(embeds)
            cut[i].append(removed)
    t5 = PaddedTokenizer(manifest.path(T5_ROLES[1]), int(text["max_sequence_length"]), int(text["pad_token_id"]),
                         "T5")
    tokens = [t5(t) for t in texts]
    outs = _run_each(make_session, manifest.path(T5_ROLES[0]),
                     [{"input_ids": ids, "attention_mask": np.ones_like(ids)} for ids, _ in tokens])
    result = []
    for i, ((_, removed), (t5_states,)) in enumerate(zip(tokens, outs)):
        clip = np.concatenate(hidden[i], axis=-1)
        if clip.shape[-1] > width or t5_states.shape[-1] != width:
            raise RuntimeInputError(f"bundle {manifest.folder}: encoder widths {clip.shape[-1]} (CLIP) and "
                                    f"{t5_states.shape[-1]} (T5) do not fit text.width {width}; rebuild the bundle")
        clip = np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        cuts = [c for c in (*cut[i], removed) if c]
        result.append(SD3Text(np.concatenate([clip, t5_states], axis=1).astype(np.float32),
                              np.concatenate(pooled[i], axis=-1).astype(np.float32),
                              max(cuts, key=len) if cuts else None))
    return result
