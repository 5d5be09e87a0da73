"""A token sample -> one training sequence: prompts, `<boi>`/`<eoi>`, tiles and thumbnail, CFG drop, loss masks.

Layouts are those of `model.special_tokens` (defined there once):
  und: <s> [<tile>? <boi> IMG*n <eoi>]* [<thumbnail> <boi> IMG*n <eoi>] PROMPT_UND caption </s>
  gen: <s> PROMPT_GEN caption <boi> IMG*n <eoi> </s>      (or PROMPT_UNCOND instead of prompt + caption)
Text targets: und -> caption and `</s>`; gen -> `<eoi>` and `</s>`. Code targets: gen image positions.

Which images a sample contributes (the rule for tiles and for samples longer than the sequence):
  1. one tile: that image, no markers;
  2. tiles <= the stage's max_tiles: every tile with `<tile>`, then the thumbnail if the stage wants one;
  3. otherwise, or if (2) does not fit the sequence length: the thumbnail alone (the whole image);
  4. still too long, or no thumbnail to fall back to: the sample is dropped and counted. An image is
     never truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.folding import Fold
from model.special_tokens import BOI, BOS, EOI, EOS, IMG, PAD, PROMPT_GEN, PROMPT_UNCOND, PROMPT_UND, THUMBNAIL, TILE
from pipeline.tokenshard import TokenSample
from synergen.errors import ConfigMismatchError, ShardError

IGNORE = -100  # label of positions that are not text targets (transformers convention)


@dataclass(frozen=True)
class LayoutIds:
    """The token ids a sequence layout needs, taken once from the run's text tokenizer."""

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    img: int
    tile: int
    thumbnail: int
    prompt_und: tuple[int, ...]
    prompt_gen: tuple[int, ...]
    prompt_uncond: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "LayoutIds":
        """Ids from a transformers tokenizer with `model.special_tokens.ALL_SPECIAL_TOKENS` added.

        The LLM's own BOS/EOS/PAD are used when it has them (see model.special_tokens)."""

        def tok_id(token: str, own: int | None = None) -> int:
            if own is not None:
                return int(own)
            i = tokenizer.convert_tokens_to_ids(token)
            if i is None or i == tokenizer.unk_token_id or i < 0:
                raise ConfigMismatchError(f"text tokenizer has no {token!r} token; add model.special_tokens.ALL_SPECIAL_TOKENS "
                                          "to it (tokenizer.add_special_tokens) before building the loader")
            return int(i)

        def enc(text: str) -> tuple[int, ...]:
            return tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=False))

        return cls(
            bos=tok_id(BOS, getattr(tokenizer, "bos_token_id", None)),
            eos=tok_id(EOS, getattr(tokenizer, "eos_token_id", None)),
            pad=tok_id(PAD, getattr(tokenizer, "pad_token_id", None)),
            boi=tok_id(BOI), eoi=tok_id(EOI), img=tok_id(IMG), tile=tok_id(TILE), thumbnail=tok_id(THUMBNAIL),
            prompt_und=enc(PROMPT_UND), prompt_gen=enc(PROMPT_GEN), prompt_uncond=enc(PROMPT_UNCOND),
        )


@dataclass(frozen=True)
class SequenceSpec:
    """The stage's sequence settings (from the mixture manifest) plus the model's fold."""

    seq_len: int
    max_tiles: int
    thumbnail: bool
    fold: Fold


@dataclass
class Sequence:
    """One document of a packed row."""

    input_ids: np.ndarray  # [L] int64; <img> at image positions
    labels: np.ndarray  # [L] int64; text targets, IGNORE elsewhere
    image_mask: np.ndarray  # [L] bool
    image_targets: np.ndarray  # [L] bool; code targets (generation images)
    codes: np.ndarray  # [N_img, fh*fw] int64; one row per True of image_mask, in order
    source: str = ""
    key: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Layout:
    """Which images of a sample go in, and how they are marked: "single", "tiles" or "tiles+thumbnail"."""

    images: tuple[int, ...]
    kind: str
    length: int


def _image_views(sample: TokenSample, task: str, spec: SequenceSpec) -> list[tuple[tuple[int, ...], str]]:
    """Candidate image selections, most preferred first (the rule in the module docstring)."""
    n_images = int(sample.codes.shape[0])
    if sample.codes.ndim != 3 or sample.codes.shape[2] != spec.fold.size:
        raise ShardError(f"sample {sample.key!r}: codes shape {tuple(sample.codes.shape)} does not hold {spec.fold} fold "
                         f"groups of {spec.fold.size} codes; re-tokenize with the model's fold")
    if n_images == 0:
        return []
    if task == "gen":  # generation has one image; if a thumbnail is present it is the whole image
        return [((n_images - 1,), "single")]
    rows, cols = sample.meta.get("tiles", [1, 1])
    n_tiles = int(rows) * int(cols)
    has_thumb = bool(sample.meta.get("thumbnail", False)) and n_images == n_tiles + 1
    if n_images != n_tiles + has_thumb:
        raise ShardError(f"sample {sample.key!r}: {n_images} images but tiles {rows}x{cols} and thumbnail="
                         f"{sample.meta.get('thumbnail')}; its shard disagrees with its metadata, re-tokenize it")
    views = []
    if n_tiles == 1:
        views.append(((0,), "single"))
    elif n_tiles <= spec.max_tiles:
        views.append((tuple(range(n_tiles + (has_thumb and spec.thumbnail))), "tiles+thumbnail" if has_thumb and spec.thumbnail else "tiles"))
    if has_thumb:
        views.append(((n_tiles,), "single"))
    return views


def _length(sample: TokenSample, task: str, images: tuple[int, ...], kind: str, uncond: bool, ids: LayoutIds) -> int:
    groups = int(sample.codes.shape[1])
    n_img = len(images) * (groups + 2) + (len(images) if kind != "single" else 0)  # <boi> IMG* <eoi>, plus markers
    if task == "und":
        return 1 + n_img + len(ids.prompt_und) + int(sample.text_ids.size) + 1
    text = len(ids.prompt_uncond) if uncond else len(ids.prompt_gen) + int(sample.text_ids.size)
    return 1 + text + n_img + 1


def plan_layout(sample: TokenSample, task: str, uncond: bool, spec: SequenceSpec, ids: LayoutIds) -> Layout | None:
    """The layout the sample gets, or None when it cannot fit `spec.seq_len` without cutting an image."""
    for images, kind in _image_views(sample, task, spec):
        n = _length(sample, task, images, kind, uncond, ids)
        if n <= spec.seq_len:
            return Layout(images, kind, n)
    return None


def build_sequence(sample: TokenSample, task: str, uncond: bool, layout: Layout, ids: LayoutIds, source: str = "") -> Sequence:
    """Lay out one sample as `plan_layout` decided (arrays allocated once at the planned length)."""
    L = layout.length
    input_ids = np.empty(L, np.int64)  # [L]
    labels = np.full(L, IGNORE, np.int64)
    image_mask = np.zeros(L, bool)
    image_targets = np.zeros(L, bool)
    t = 0

    def put(tokens, target: bool = False) -> None:
        nonlocal t
        n = len(tokens)
        input_ids[t:t + n] = tokens
        if target:
            labels[t:t + n] = tokens
        t += n

    def image(i: int, marker: int | None, target: bool) -> None:
        nonlocal t
        if marker is not None:
            put((marker,))
        put((ids.boi,))
        n = int(sample.codes.shape[1])
        input_ids[t:t + n] = ids.img
        image_mask[t:t + n] = True
        image_targets[t:t + n] = target
        t += n
        put((ids.eoi,), target=target)  # gen: <eoi> is a text target after the image

    put((ids.bos,))
    caption = sample.text_ids
    if task == "und":
        n_tiles = len(layout.images) - (layout.kind == "tiles+thumbnail")
        for j, i in enumerate(layout.images):
            marker = None if layout.kind == "single" else (ids.tile if j < n_tiles else ids.thumbnail)
            image(i, marker, target=False)
        put(ids.prompt_und)
        put(caption, target=True)
        put((ids.eos,), target=True)
    else:
        if uncond:
            put(ids.prompt_uncond)
        else:
            put(ids.prompt_gen)
            put(caption)
        for i in layout.images:
            image(i, None, target=True)
        put((ids.eos,), target=True)
    if t != L:
        raise AssertionError(f"sample {sample.key!r}: built {t} positions, planned {L}")  # an invariant, not data validation
    # [N_img, fh*fw]: the chosen images' fold groups, in layout order
    codes = sample.codes[list(layout.images)].reshape(-1, sample.codes.shape[2]).astype(np.int64)
    return Sequence(input_ids, labels, image_mask, image_targets, codes, source=source, key=sample.key)
