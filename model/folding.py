"""Token-folding geometry, defined once: a code grid <-> fold groups, and its exact inverse.

A `gh x gw` VQ code grid is cut into `fh x fw` blocks (paper default 2x8: 2 rows x 8 columns, so a
64x64 grid becomes 256 blocks of 16 codes). Blocks are in raster order; codes inside a block are
row-major (SynerGen-VL Fig. 3). Both numpy arrays and torch tensors are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from synergen.errors import SynergenError


@dataclass(frozen=True)
class Fold:
    """An `fh x fw` fold: `fh` code rows by `fw` code columns make one LLM position."""

    fh: int = 2
    fw: int = 8

    def __post_init__(self) -> None:
        if self.fh < 1 or self.fw < 1:
            raise SynergenError(f"fold {self.fh}x{self.fw}: both sides must be >= 1 (e.g. 2x8)")

    @property
    def size(self) -> int:
        """Codes per fold group (= per LLM position)."""
        return self.fh * self.fw

    def __str__(self) -> str:
        return f"{self.fh}x{self.fw}"

    @classmethod
    def parse(cls, text: "str | Fold | tuple[int, int] | list[int]") -> "Fold":
        """`"2x8"`, `(2, 8)` or a Fold -> Fold."""
        if isinstance(text, Fold):
            return text
        if isinstance(text, (tuple, list)):
            return cls(int(text[0]), int(text[1]))
        try:
            fh, fw = (int(p) for p in str(text).lower().split("x"))
        except ValueError:
            raise SynergenError(f"fold {text!r} is not ROWSxCOLS; write it like '2x8'") from None
        return cls(fh, fw)

    def check_grid(self, gh: int, gw: int) -> None:
        if gh % self.fh or gw % self.fw:
            raise SynergenError(
                f"code grid {gh}x{gw} does not fold exactly by {self}: choose an image size that is a "
                f"multiple of (VQ downsample x fold), or a fold that divides the grid"
            )

    def groups(self, gh: int, gw: int) -> int:
        """Number of fold groups (LLM positions) of a `gh x gw` grid."""
        self.check_grid(gh, gw)
        return (gh // self.fh) * (gw // self.fw)


def fold_codes(codes, fold: Fold):
    """`[..., gh, gw]` codes -> `[..., (gh/fh)*(gw/fw), fh*fw]` fold groups (raster blocks, row-major inside)."""
    *lead, gh, gw = codes.shape
    fold.check_grid(gh, gw)
    bh, bw = gh // fold.fh, gw // fold.fw
    x = codes.reshape(*lead, bh, fold.fh, bw, fold.fw)  # [..., bh, fh, bw, fw]
    x = x.swapaxes(-3, -2)  # [..., bh, bw, fh, fw]
    return x.reshape(*lead, bh * bw, fold.size)


def unfold_codes(groups, fold: Fold, gh: int, gw: int):
    """Exact inverse of `fold_codes`: `[..., n_groups, fh*fw]` -> `[..., gh, gw]`."""
    *lead, n, k = groups.shape
    if n != fold.groups(gh, gw) or k != fold.size:
        raise SynergenError(
            f"fold groups of shape [{n}, {k}] do not match grid {gh}x{gw} under fold {fold} "
            f"(expected [{fold.groups(gh, gw)}, {fold.size}])"
        )
    bh, bw = gh // fold.fh, gw // fold.fw
    x = groups.reshape(*lead, bh, bw, fold.fh, fold.fw)
    x = x.swapaxes(-3, -2)  # [..., bh, fh, bw, fw]
    return x.reshape(*lead, gh, gw)
