"""A site's units as (samples, units) blocks, and their sums: the kernels under `stats.Moments`.

A site's activation is read in cache-sized slabs of its batch axis, each copied once into the precision
of the statistics (float64, or float32 minus a per-unit shift) with its unit axis first or last as the
layout allows (or, already in that precision with no shift, read where it lies: units last, or a conv map as
(batch, units, positions) slabs, `_by_position`), then summed: per-unit sums and sums of squares, and the cross
products x^T y of two models' units. Running sums are float64 whatever the block precision. Conv positions count
as samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .spec import Site


def unit_matrix(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(samples, units) float64 matrix of an activation whose units lie on axis `dim` (e.g. (N,C,H,W) -> (NHW, C))."""
    return _units_major(t, Site(None, dim)).T


def site_matrix(t: torch.Tensor, site: Site) -> torch.Tensor:
    """(samples, units) float64 matrix of a site's units in its tensor (its slice of a fused projection)."""
    return _units_major(t, site).T


def _samples(t: torch.Tensor, site: Site, dtype: torch.dtype = torch.float64,
             shift: torch.Tensor | None = None, copy: bool = True) -> tuple[torch.Tensor, int]:
    """A site's units in t as a new `dtype` matrix, minus a per-unit `shift` (units,) when given (one pass
    over memory: the cast, the shift and any move of the unit axis in one copy) and its samples axis:
    (samples, units) with axis 0 when the units are t's last axis, else (units, samples) with axis 1, conv
    positions and batch rows pooled (a (N, C, H, W) map gives (C, N*H*W)). The copy is the caller's to
    overwrite. With copy=False, units last, t already in `dtype` and no shift, the matrix is a view of t
    where its layout allows (not to be overwritten: `_unit_blocks` says which blocks are views)."""
    d = site.dim
    if site.size is not None:
        t = t.narrow(d, site.start, site.size)
    t = t.detach()
    last = d == t.ndim - 1
    if not copy and last and shift is None and t.dtype == dtype:
        return t.reshape(-1, t.shape[d]), 0
    src = t if last else t.movedim(d, 0)
    out = torch.empty(src.shape, dtype=dtype, device=t.device)
    if shift is None:
        out.copy_(src)
    else:
        torch.sub(src, shift.to(dtype).view(-1, *[1] * (src.ndim - 1)) if not last else shift.to(dtype), out=out)
    return (out.view(-1, t.shape[d]), 0) if last else (out.view(t.shape[d], -1), 1)


def joint_matrix(acts, site: Site, dtype: torch.dtype = torch.float64, shift: torch.Tensor | None = None) -> torch.Tensor:
    """(samples, N * units) of a site's units in the activations of N models side by side (model i's units in
    columns i*units..), in `dtype`, minus a per-column `shift` (N * units,) when given: each model's units are
    cast and shifted in one copy (`_samples`), then placed side by side."""
    shifts = shift.chunk(len(acts)) if shift is not None else [None] * len(acts)
    blocks = [_samples(a, site, dtype, s) for a, s in zip(acts, shifts)]
    return torch.cat([x if axis == 0 else x.T for x, axis in blocks], 1)


def _units_major(t: torch.Tensor, site: Site) -> torch.Tensor:
    """(units, samples) float64 of a site's units (a transposed view when the units are the last axis)."""
    x, axis = _samples(t, site)
    return x if axis == 1 else x.T


_BLOCK_BYTES = 8 * 2**20  # float64 bytes per block of samples: small enough to stay in cache between reductions


def _unit_blocks(t: torch.Tensor, site: Site, dtype: torch.dtype = torch.float64, shift: torch.Tensor | None = None,
                 by_position: bool = False) -> Iterator[tuple[torch.Tensor, int, bool]]:
    """`_samples` of consecutive slabs of t's batch axis, each at most ~_BLOCK_BYTES, with whether the block
    is a copy of our own (True) or a view of t (False: already in `dtype`, no shift; units last, or with
    `by_position` (see `_by_position`) a conv map's (batch, units, positions) slab, axis 2): the sums over a
    large activation then read each block while it is still in cache, and never hold a float64 copy of the
    whole activation. With the squares taken in place in each copied block, the paired per-unit sums of a (256,
    256, 16, 16) map take 55-60 ms instead of 218 ms (one cast copy of the whole map, products as new
    tensors); a view saves the copy (a ViT's float32 token sites: 19 -> 9 ms per (12800, 128) pair)."""
    if site.dim == 0 or t.ndim < 2 or t.shape[0] == 0:
        slabs = [t]
    else:
        units = site.size if site.size is not None else t.shape[site.dim]
        row_bytes = 8 * t[0].numel() * units // max(t.shape[site.dim], 1)
        step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
        slabs = (t.narrow(0, i, min(step, t.shape[0] - i)) for i in range(0, t.shape[0], step))
    for slab in slabs:
        if by_position:
            yield (slab.narrow(1, site.start, site.size) if site.size is not None else slab).detach().flatten(2), 2, False
        else:
            x, axis = _samples(slab, site, dtype, shift, copy=False)
            yield x, axis, not _shares_memory(x, slab)


def _by_position(ts: tuple[torch.Tensor, ...], site: Site, dtype: torch.dtype, shifts: tuple) -> bool:
    """Whether a site's blocks in activations ts (one layout for all) can be read where they lie, in their own
    (batch, units, positions) layout: already in `dtype`, no shifts, units on axis 1 of row-major maps with at
    least as many positions as units. Its cross products are then one small matrix product per example (bmm)
    and no copy moves the unit axis ((256, 16, 32, 32) float32 pair, zero shift: 18 -> 5 ms, one thread); with
    fewer positions than units the per-example products are slower than one large product of a copy ((64,
    2048, 2, 2): 49 -> 935 ms). Blocks that need a copy anyway (a cast or a shift) are copied with their units
    first, as before: bmm gained nothing there on ResNet20 x4's maps."""
    if site.dim != 1 or any(s is not None for s in shifts) or any(t.ndim < 3 or t.dtype != dtype for t in ts):
        return False
    units = site.size if site.size is not None else ts[0].shape[1]
    return all(t.is_contiguous() and len(t) > 0 and t[0, 0].numel() >= units for t in ts)


def _shares_memory(x: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether block x is a view of activation t (then the activation's: never squared in place)."""
    return x.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


def _count(x: torch.Tensor, axis: int) -> int:
    """Samples in a block from `_unit_blocks` (axis 2: batch rows times positions)."""
    return x.shape[0] * x.shape[2] if axis == 2 else x.shape[axis]


def _sum_samples(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-unit sums of a block from `_unit_blocks`: (samples, units) summed over axis 0 as a matrix-vector
    product (BLAS: 1.4-1.9x faster than x.sum(0) on (2048, 512) to (16384, 64) float64 blocks, one thread),
    (units, samples) over axis 1 by x.sum(1), (batch, units, positions) over its positions, then its batch."""
    if axis == 0:
        return torch.ones(x.shape[0], dtype=x.dtype, device=x.device) @ x
    if axis == 2:
        return x.sum(2).sum(0)
    return x.sum(1)


def _sum_squares(x: torch.Tensor, axis: int, owned: bool) -> torch.Tensor:
    """Per-unit sums of squares of a block from `_unit_blocks`: squared in place when the block is a copy of our
    own (never in an activation's view); a (batch, units, positions) block by the norms of its rows (one pass,
    no temporary: 0.6 against 1.1 ms for x * x on a (16, 262144) float32 view)."""
    if axis == 2:
        return torch.linalg.vector_norm(x, dim=2).square_().sum(0)
    return _sum_samples(x.square_() if owned else x * x, axis)


def _add_cross(sums: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, axis: int) -> None:
    """sums["xy"] += x^T y (p, q) of two blocks from `_unit_blocks` in one layout: one matrix product of
    (p, m) and (m, q) operands, or (axis 2) the sum over the batch of per-example products."""
    if axis == 2:
        with full_float32_matmul():
            _accumulate(sums, "xy", torch.bmm(x, y.transpose(1, 2)).sum(0))
    else:
        accumulate_product(sums, "xy", *((x, y.T) if axis == 1 else (x.T, y)))


_SLAB_BYTES = 2**20  # float64 bytes of one row slab of a float32 matrix added into float64 sums


def _accumulate(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """sums[name] += value, the running sum kept in float64. A float32 matrix is added in row slabs of
    ~_SLAB_BYTES: add_ first makes a float64 copy of its operand, which for a whole (2048, 2048) cross
    product is a fresh 32 MiB block (24 ms, one thread, against 2 ms in 1 MiB slabs); the sums are the same."""
    if name not in sums:
        sums[name] = value.to(torch.float64)
        return
    total = sums[name]
    if value.dtype == total.dtype or value.ndim < 2:
        total.add_(value)
        return
    rows = max(1, _SLAB_BYTES // (8 * value[0].numel()))
    for i in range(0, value.shape[0], rows):
        total[i:i + rows].add_(value[i:i + rows])


def accumulate_product(sums: dict[str, torch.Tensor], name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """sums[name] += a @ b for a (p, m) and b (m, q), into a float64 running sum: float64 operands in place by
    addmm_ (no (p, q) temporary); float32 operands by one float32 product (full float32 matmul precision:
    never TF32 or bfloat16 passes) added into it."""
    if a.dtype == torch.float64 and name in sums:
        sums[name].addmm_(a, b)
        return
    with full_float32_matmul():
        _accumulate(sums, name, a @ b)


@contextlib.contextmanager
def full_float32_matmul() -> Iterator[None]:
    """Float32 matrix products at full precision for the duration (no TF32 / reduced-precision passes)."""
    before, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def unit_sums(t: torch.Tensor, site: Site, dtype: torch.dtype = torch.float64,
              shift: torch.Tensor | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(samples, sum x, sum x^2) per unit of a site (conv positions pooled as samples), float64 sums of blocks
    taken in `dtype`, of x - shift when a per-unit `shift` (units,) is given."""
    n, sums = 0, {}
    for x, axis, owned in _unit_blocks(t, site, dtype, shift, _by_position((t,), site, dtype, (shift,))):
        n += _count(x, axis)
        _accumulate(sums, "x", _sum_samples(x, axis))
        _accumulate(sums, "xx", _sum_squares(x, axis, owned))
    return n, sums["x"], sums["xx"]


def paired_sums(a: torch.Tensor, b: torch.Tensor, site: Site, cross: str = "full", sums: dict | None = None,
                dtype: torch.dtype = torch.float64, shifts: tuple | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    """(samples, {x, xx, y, yy, xy}) float64 sums of a site's units in a (x) and b (y): per-unit sums and sums
    of squares, and the cross sums: the (p, q) matrix x y^T (cross="full", for correlations: one matrix
    product over all samples) or only its diagonal, unit i with unit i (cross="diag", for REPAIR's
    per-unit covariance). Given `sums` (running sums of earlier batches), the new ones are added to them
    in place, the cross product by addmm_ (no (p, q) temporary per batch), and that dict is returned.
    Blocks are taken in `dtype`; `shifts` (shift of x (p,), shift of y (q,)) are subtracted first."""
    n, sums = 0, {} if sums is None else sums
    sx, sy = shifts if shifts is not None else (None, None)
    by_position = _by_position((a, b), site, dtype, (sx, sy))  # blocks of a and b in one layout
    for (x, axis, x_owned), (y, _, y_owned) in zip(_unit_blocks(a, site, dtype, sx, by_position),
                                                   _unit_blocks(b, site, dtype, sy, by_position)):
        n += _count(x, axis)
        if cross != "full":
            _accumulate(sums, "xy", _sum_samples(x * y, axis))
        else:
            _add_cross(sums, x, y, axis)
        for name, v, owned in (("x", x, x_owned), ("y", y, y_owned)):
            _accumulate(sums, name, _sum_samples(v, axis))
            _accumulate(sums, name * 2, _sum_squares(v, axis, owned))
    return n, sums
