"""Streaming statistics of hidden units (`Moments`), read at a spec's sites in one forward pass.

Every statistic is kept as a sum over samples (count, sum x, sum x^2 or x x^T, sum x y^T), never as an
average of per-batch estimates: sums are exact in any batch order and combine across processes with
one all-reduce (`Moments.all_reduce_`). Conv activations are pooled over spatial positions: a (N, C, H, W)
tensor contributes N*H*W samples of C units (as in Jordan et al. 2022, Appendix B.2).

Two precisions. "float64": every block is cast to float64 and summed in float64 (exact to rounding).
"float32": each block's products and sums are taken in float32 on data shifted by a per-unit reference
(the mean of the first rows seen), then added into float64 running sums, so large means do not cancel
catastrophically in the variances (the shifted-data form of Chan, Golub and LeVeque 1983); no float64 copy
of an activation is made. Where every unit of a site has a first-rows |mean| <= 2 std, the reference is zero
(the relative error of a variance grows as 1 + mean^2 / std^2: at most 5x that of centred data, 1.5e-6) and a
float32 activation with its units last is summed where it lies, without a copy. Derived statistics add
the shift back where it matters (means).

The block kernels are in `onebasin.sums`, the taps that read sites in `onebasin.taps`, the sharding of
calibration batches over processes in `onebasin.distributed`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .checks import eval_mode  # noqa: F401  (re-exported: statistics run models in eval mode)
from .distributed import all_reduce_count, any_rank, batches, distributed, reduce_device
from .errors import OnebasinError
from .graph import batch_size, model_inputs, shape_of, take_rows
from .spec import Site
from .sums import _accumulate, _samples, _sum_samples, accumulate_product, full_float32_matmul, joint_matrix, paired_sums, unit_sums
from .taps import SiteTaps


PRECISIONS = ("float32", "float64")
_precision = ["float32"]  # the default of every Moments made inside `statistics_precision`


def check_precision(precision: str) -> torch.dtype:
    """The dtype of a statistics precision ("float32" or "float64"); ValueError naming the valid ones."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return torch.float32 if precision == "float32" else torch.float64


@contextlib.contextmanager
def statistics_precision(precision: str | None) -> Iterator[None]:
    """Every Moments made for the duration without its own precision takes `precision` (None: unchanged).

    The public entry points (merge, compare, align, repair, merge_many, barrier_curve) take `precision=` and
    set it here once, so the methods and REPAIR below them need no argument of their own.
    """
    if precision is None:
        yield
        return
    check_precision(precision)
    _precision.append(precision)
    try:
        yield
    finally:
        _precision.pop()


def current_precision() -> str:
    """The precision a Moments made now takes by default (the innermost `statistics_precision`)."""
    return _precision[-1]


def takes_precision(fn):
    """Decorate an entry point with a `precision` argument: its call runs inside `statistics_precision`."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with statistics_precision(signature.bind(*args, **kwargs).arguments.get("precision")):
            return fn(*args, **kwargs)

    return call


_SHIFT_ROWS = 64  # batch rows whose per-unit mean is the float32 shift (not a copy of a whole activation)
_ZERO_SHIFT_RATIO = 2.0  # units with |mean| <= this x std need no float32 shift (docs/results.md 3.1: <= 1.5e-6 measured)


class Moments:
    """Streaming sums of x (samples, p) and, optionally, of a paired y (samples, q), in float64.

    Keeps count, sum x, sum x^2 (or the full x x^T when `full=True`), and with `paired=True` also
    sum y, sum y^2 and the cross sum x y^T. Derived statistics are population (1/n) moments.
    precision="float32" takes each batch's products and sums in float32 on x - c and y - d, c and d the
    per-unit means of the first rows seen (`shift`; zero where they are within two stds, `_reference`), added
    into float64 sums (see the module docstring);
    "float64" (shift 0) is exact to float64 rounding. `sums` always hold the sums of shifted values.
    precision=None takes the enclosing `statistics_precision` (float32, the default, outside any).
    `models` > 1: x holds the units of that many models side by side, with cross sums between them
    (`update_joint`, `joint_moments`).
    """

    def __init__(self, full: bool = False, paired: bool = False, precision: str | None = None, models: int = 1):
        precision = precision or _precision[-1]
        self.full, self.paired, self.precision, self.models = full, paired, precision, models
        self.dtype = check_precision(precision)
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.shift: dict[str, torch.Tensor] = {}  # "x", "y": per-unit float64 reference (float32 precision only)
        self._zero: dict[str, tuple[torch.Tensor, bool]] = {}  # name -> (its shift, whether all zero): read once per shift

    def _add(self, name: str, value: torch.Tensor) -> None:
        """sums[name] += value, in place (value: a fresh tensor of this update, kept as the first sum)."""
        _accumulate(self.sums, name, value)

    def _shifted(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x (m, units) in this precision, minus the shift of `name` (set from x's mean on first use)."""
        if self.dtype == torch.float64:
            return x.to(torch.float64)
        if name not in self.shift:
            self.shift[name] = self._representable(x.mean(0, dtype=torch.float64))
        return (x - self.shift[name].to(x.dtype)).to(self.dtype)

    def _block_shift(self, name: str, site: Site, *ts: torch.Tensor) -> torch.Tensor | None:
        """The shift of `name` for a site's activation t (float32 precision), set from t's per-unit mean (the
        units of several activations ts side by side: their means side by side); None for no shift (float64
        precision, or a zero shift: see `_reference`)."""
        if self.dtype == torch.float64:
            return None
        if name not in self.shift:  # from the first rows only: any reference near the mean will do
            means, squares = zip(*(self._head_moments(t, site) for t in ts))
            self.shift[name] = self._reference(torch.cat(means), torch.cat(squares))
        shift = self.shift[name]
        known = self._zero.get(name)
        if known is None or known[0] is not shift:  # a new shift (set here, re-based, or agreed across ranks)
            known = self._zero[name] = (shift, not shift.any())  # one device sync per shift, not per block
        return None if known[1] else shift

    def _reference(self, mean: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
        """The float32 shift of units with these first-rows means and means of squares: zero when every
        |mean| <= _ZERO_SHIFT_RATIO std, i.e. (1 + 1 / ratio^2) mean^2 <= mean of x^2 (then a unit's squares and
        products lose at most 1 + ratio^2 = 5 times the relative precision of centred data, and a float32
        activation with its units last is summed without a copy: `sums._unit_blocks`), else the means, rounded
        to this precision."""
        if bool(((1 + _ZERO_SHIFT_RATIO ** -2) * mean.square() <= mean_square).all()):
            return torch.zeros_like(mean)
        return self._representable(mean)

    def _head_moments(self, t: torch.Tensor, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-unit float64 (mean, mean of squares) of a site's units in the first _SHIFT_ROWS rows of t, summed in
        this precision (no cancellation: enough to place a reference and to compare |mean| with std)."""
        head = t.narrow(0, 0, min(len(t), _SHIFT_ROWS)) if site.dim != 0 and t.ndim > 1 else t
        x, axis = _samples(head, site, self.dtype, copy=False)
        m = x.shape[axis]
        return _sum_samples(x, axis).double() / m, _sum_samples(x * x, axis).double() / m

    def _representable(self, shift: torch.Tensor) -> torch.Tensor:
        """`shift` rounded to this precision (kept as float64): the value subtracted is the value added back."""
        return shift.to(self.dtype).to(torch.float64)

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add samples x (m, p) [and y (m, q)]."""
        x = self._shifted("x", x)
        self._add_rows(x)
        with full_float32_matmul():
            if self.paired:
                y = self._shifted("y", y)
                self._add("y", y.sum(0))
                self._add("yy", (y * y).sum(0))
                self._add("xy", x.T @ y)

    def _add_rows(self, x: torch.Tensor) -> None:
        """Add the sums of a block x (m, p) already in this precision and shifted: count, sum x, sum x^2 or x x^T."""
        self.n += x.shape[0]
        with full_float32_matmul():
            self._add("x", x.sum(0))
            self._add("xx", x.T @ x if self.full else (x * x).sum(0))

    def update_joint(self, acts: Sequence[torch.Tensor], site: Site, cross: bool = True) -> None:
        """Add a site's units in the activations of `models` networks (x = [model 0 | ... | model N-1], full=False):
        count, per-unit sums and squares and, with `cross`, the cross sums between models sums[f"xy{i}"] =
        (x_i - c_i)^T [x_{i+1} - c_{i+1} | ... | x_{N-1} - c_{N-1}] of shape (units, (N-1-i) * units), i < N-1,
        every block about the shift c of x (float32 precision), so that the covariances follow from shifted means."""
        x = joint_matrix(acts, site, self.dtype, self._block_shift("x", site, *acts))  # (samples, N * units)
        self._add_rows(x)
        if cross:
            n = x.shape[1] // self.models
            for i in range(self.models - 1):
                accumulate_product(self.sums, f"xy{i}", x[:, i * n:(i + 1) * n].T, x[:, (i + 1) * n:])

    def update_pair(self, a: torch.Tensor, b: torch.Tensor, site: Site, cross: str = "full") -> None:
        """Add the units of site `site` in activations a (of A) and b (of B) (paired=True), fast path.

        The same sums as update(site_matrix(a, site), site_matrix(b, site)), without moving a conv's unit
        axis last (see `paired_sums`); cross="diag" keeps only unit i with unit i in sums["xy"] (p,).
        """
        if self.full or not self.paired:
            raise ValueError("update_pair fills paired moments of per-unit variances (full=False, paired=True)")
        shifts = (self._block_shift("x", site, a), self._block_shift("y", site, b))
        n, _ = paired_sums(a, b, site, cross, self.sums, self.dtype, shifts)
        self.n += n

    def update_units(self, t: torch.Tensor, site: Site) -> None:
        """Add the units of site `site` in activation t (full=False, unpaired), fast path (`unit_sums`)."""
        n, total, squares = unit_sums(t, site, self.dtype, self._block_shift("x", site, t))
        self.n += n
        self._add("x", total)
        self._add("xx", squares)

    def add_sums_(self, n: int, sums: dict[str, torch.Tensor]) -> "Moments":
        """Add `n` samples' sums (taken about this Moments' shift: the same names and shapes), in place."""
        self.n += n
        for name, value in sums.items():
            self._add(name, value)
        return self

    def rebase_(self, shift: dict[str, torch.Tensor]) -> "Moments":
        """Re-express the sums about new per-unit shifts {"x": c', "y": d'} (rounded to this precision), in place
        in float64: with e = c - c', sum(x - c') = S + n e, sum(x - c')^2 = SS + 2 e S + n e^2, and likewise for
        x x^T, x y^T and the joint cross sums (`_products`)."""
        shift = {k: self._representable(v) for k, v in shift.items()}  # later updates subtract exactly this
        if not self.sums:
            self.shift = shift
            return self
        e = {k: self.shift.get(k, torch.zeros_like(v)).to(v) - v for k, v in shift.items()}
        s = {k: self.sums[k].clone() for k in ("x", "y") if k in self.sums}
        for name, (a, rows, b, cols) in self._products().items():
            if name in self.sums:
                ea, sa, eb, sb = e[a][rows], s[a][rows], e[b][cols], s[b][cols]
                if self.sums[name].ndim == 2:
                    self.sums[name] += torch.outer(ea, sb) + torch.outer(sa, eb) + self.n * torch.outer(ea, eb)
                else:  # per-unit sums of squares or (diagonal) cross sums
                    self.sums[name] += ea * sb + sa * eb + self.n * ea * eb
        for k in s:
            self.sums[k] += self.n * e[k]
        self.shift = shift
        return self

    def _products(self) -> dict[str, tuple[str, slice, str, slice]]:
        """Every product sum by name: (left factor "x"/"y", its columns, right factor, its columns)."""
        every = slice(None)
        out = {"xx": ("x", every, "x", every), "yy": ("y", every, "y", every), "xy": ("x", every, "y", every)}
        n = self.sums["x"].shape[0] // self.models if "x" in self.sums else 0
        for i in range(self.models - 1):  # the joint cross sums of `update_joint`
            out[f"xy{i}"] = ("x", slice(i * n, (i + 1) * n), "x", slice((i + 1) * n, None))
        return out

    def all_reduce_(self) -> "Moments":
        """Sum the statistics over all processes of an initialised torch.distributed group (in place).

        Every rank takes part with the same tensors in the same order, also a rank that saw no batch
        (its sums are zeros of the shapes the other ranks report). Shifted sums (float32 precision) are
        first re-expressed about one shift for all ranks: the count-weighted mean of the ranks' shifts.
        """
        if distributed()[1] == 1:
            return self
        shapes: list = [None] * dist.get_world_size()
        dist.all_gather_object(shapes, {k: tuple(v.shape) for k, v in self.sums.items()})
        names = sorted({k: s for d in shapes for k, s in d.items()}.items())
        device = reduce_device(next(iter(self.sums.values())).device if self.sums else None)
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=device)
        dist.all_reduce(n)
        self._common_shift({k: shape[0] for k, shape in names if k in ("x", "y")}, device)
        self.n = int(n.item())
        for name, shape in names:
            t = self.sums.get(name)
            t = torch.zeros(shape, dtype=torch.float64, device=device) if t is None else t.to(device)
            dist.all_reduce(t)
            self.sums[name] = t
        return self

    def _common_shift(self, sizes: dict[str, int], device: torch.device | None = None) -> "Moments":
        """Rebase this rank's sums on one shift for all ranks, the count-weighted mean of the ranks' shifts of
        {"x": units, "y": units} (`agreed_shift`, a collective); float64 sums have no shift and stay."""
        if self.dtype == torch.float64:
            return self
        common = agreed_shift(self.shift, self.n, sizes, device)
        return self.rebase_({k: v.to(self.sums[k].device) if k in self.sums else v for k, v in common.items()})

    def _check(self) -> None:
        if self.n == 0:
            raise OnebasinError("no samples: the data yielded no examples to measure")

    def _offset(self, name: str) -> torch.Tensor | float:
        return self.shift.get(name, 0.0)

    @property
    def nbytes(self) -> int:
        """Bytes the running sums hold."""
        return sum(t.nelement() * t.element_size() for t in self.sums.values())

    @property
    def shifted_mean_x(self) -> torch.Tensor:
        """Mean of x - shift (the mean itself at float64 precision)."""
        self._check()
        return self.sums["x"] / self.n

    @property
    def shifted_mean_y(self) -> torch.Tensor:
        self._check()
        return self.sums["y"] / self.n

    @property
    def mean_x(self) -> torch.Tensor:
        return self.shifted_mean_x + self._offset("x")

    @property
    def mean_y(self) -> torch.Tensor:
        return self.shifted_mean_y + self._offset("y")

    @property
    def var_x(self) -> torch.Tensor:
        xx = self.sums["xx"].diagonal() if self.full else self.sums["xx"]
        return (xx / self.n - self.shifted_mean_x**2).clamp_min(0)

    @property
    def var_y(self) -> torch.Tensor:
        return (self.sums["yy"] / self.n - self.shifted_mean_y**2).clamp_min(0)

    @property
    def cov_x(self) -> torch.Tensor:
        """(p, p) covariance of x (needs full=True)."""
        m = self.shifted_mean_x
        return self.sums["xx"] / self.n - torch.outer(m, m)

    @property
    def second_moment_x(self) -> torch.Tensor:
        """(p, p) uncentred E[x x^T] (needs full=True)."""
        self._check()
        raw = self.sums["xx"] / self.n
        if "x" not in self.shift:
            return raw
        c, m = self.shift["x"], self.shifted_mean_x
        return raw + torch.outer(c, m) + torch.outer(m, c) + torch.outer(c, c)

    @property
    def cov_xy(self) -> torch.Tensor:
        """(p, q) cross-covariance of x and y (needs paired=True)."""
        return (self.sums["xy"] / self.n).addr_(self.shifted_mean_x, self.shifted_mean_y, alpha=-1)

    @property
    def second_moment_xy(self) -> torch.Tensor:
        """(p, q) uncentred E[x y^T] (needs paired=True and full cross sums)."""
        self._check()
        raw = self.sums["xy"] / self.n
        if not self.shift:
            return raw
        c, d = self.shift["x"], self.shift["y"]
        return raw + torch.outer(c, self.shifted_mean_y) + torch.outer(self.shifted_mean_x, d) + torch.outer(c, d)

    @property
    def cov_xy_diag(self) -> torch.Tensor:
        """(p,) covariance of x's unit i with y's unit i, from per-unit (cross="diag") cross sums."""
        return self.sums["xy"] / self.n - self.shifted_mean_x * self.shifted_mean_y

    def cov_xy_matched(self, perm: torch.Tensor) -> torch.Tensor:
        """(p,) covariance of x's unit i with y's unit perm[i] (needs the full cross sums), without the (p, q) matrix."""
        self._check()
        xy = self.sums["xy"][torch.arange(len(perm), device=perm.device), perm]
        return xy / self.n - self.shifted_mean_x * self.shifted_mean_y[perm]

    def corr_xy(self) -> torch.Tensor:
        """(p, q) Pearson correlation between every unit of x and every unit of y, in [-1, 1].

        A unit that is constant over the data (a dead ReLU) has no correlation: its rows/columns are 0.
        Constant means its variance is at rounding level of its second moment. One (p, q) matrix is
        allocated; centring and scaling are done in place (ResNet50's 2048-unit sites).
        """
        sx = _live_std(self.var_x, self._mean_square("x"))
        sy = _live_std(self.var_y, self._mean_square("y"))
        return self.cov_xy.mul_(_inverse_or_zero(sx)[:, None]).mul_(_inverse_or_zero(sy)).clamp_(-1, 1)

    def _mean_square(self, name: str) -> torch.Tensor:
        """E[x^2] per unit, unshifted (the scale a variance is rounding noise against)."""
        sq = self.sums[name * 2]
        sq = sq.diagonal() if self.full and name == "x" else sq
        if name not in self.shift:
            return sq / self.n
        m = self.sums[name] / self.n
        return (sq / self.n - m**2).clamp_min(0) + (m + self.shift[name]) ** 2


def agreed_shift(shift: dict[str, torch.Tensor], weight: float, sizes: dict[str, int],
                 device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The `weight`-weighted mean over all processes of their per-unit shifts {name: (sizes[name],)}, in one
    all-reduce (a collective: every rank calls it; a rank without a shift passes weight 0)."""
    dev = reduce_device(device)
    zeros = torch.zeros(sum(sizes.values()), dtype=torch.float64, device=dev)
    local = torch.cat([shift[k].to(dev) * weight if k in shift else zeros[:n] for k, n in sizes.items()]
                      + [torch.tensor([float(weight)], dtype=torch.float64, device=dev)])
    dist.all_reduce(local)
    return dict(zip(sizes, (local[:-1] / max(local[-1].item(), 1.0)).split(list(sizes.values()))))


def _live_std(var: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
    """std, with 0 for units whose variance is within float64 rounding of their mean square."""
    return torch.where(var > 1e-12 * mean_square, var.sqrt(), torch.zeros_like(var))


def _inverse_or_zero(std: torch.Tensor) -> torch.Tensor:
    """1 / std, and 0 where std is 0 (a constant unit: no correlation)."""
    return torch.where(std > 0, 1 / std.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(std))


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def paired_shapes(units: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the sums of paired moments of two models' units (full cross sums)."""
    return {"x": (units,), "xx": (units,), "y": (units,), "yy": (units,), "xy": (units, units)}


def joint_shapes(units: int, n_models: int, cross: bool = True) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one site's joint sums (`joint_moments`): per-unit sums and squares of N models' units
    and, with `cross`, the cross sums between models xy{i} (units, (N-1-i) units), i < N-1."""
    out = {"x": (n_models * units,), "xx": (n_models * units,)}
    return out | ({f"xy{i}": (units, (n_models - 1 - i) * units) for i in range(n_models - 1)} if cross else {})


def sum_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """float64 bytes of sums of these shapes (e.g. joint_shapes: N(N-1)/2 units^2 cross sums, (N-1)/(2N) of the
    Gram matrix, and 2 N units)."""
    return 8 * sum(math.prod(shape) for shape in shapes.values())


def pack_passes(costs: dict[str, int], max_memory: int | None) -> list[list[str]]:
    """Keys of `costs` (bytes each) in order, packed into passes over the data whose bytes fit in `max_memory`:
    a pass is closed when the next key would overflow it (a key larger than the budget has a pass of its own).
    None: one pass."""
    passes, used = [], 0
    for key, cost in costs.items():
        if not passes or (max_memory is not None and used + cost > max_memory):
            passes.append([])
            used = 0
        passes[-1].append(key)
        used += cost
    return passes


def rows_per_slice(
    graph, sites: list[Site], max_memory: int | None, models: int = 2, unknown: int | None = None,
) -> int | None:
    """Input rows per slice so that the tapped activations of `models` networks at `sites` fit in `max_memory` bytes
    (from the shapes of the captured `graph`; at least 1). None: whole batches (no limit, or a graph exported for
    one batch size). Sites read by hooks, or no graph: their sizes are unknown, so `unknown` rows (None: whole
    batches)."""
    if max_memory is None or (graph is not None and graph.batch is not None):
        return None
    if graph is None or any(s.node is None for s in sites):
        return unknown
    per_row, rows = 0, max(batch_size(graph.example), 1)
    for node in {graph.node(s.node) for s in sites}:
        if shape := shape_of(node):  # every model's tensor at this node, per input row
            per_row += models * node.meta["val"].element_size() * math.prod(shape) // rows
    return max(1, max_memory // per_row) if per_row else None


def joint_moments(
    models: Sequence[nn.Module], sites: list[Site], data: Iterable, max_examples: int | None = 5000, cross: bool = True,
    chunk: int = 64, graph=None, precision: str | None = None,
) -> tuple[list[Moments], int]:
    """Sums of [units of model 0 | ... | model N-1] at every site, in ONE pass (N forwards per batch).

    Returns (one Moments(models=N) per site over (samples, N * units) columns: count, per-unit sums and sums of
    squares, and with `cross` the cross sums between models, sums[f"xy{i}"] = x_i^T [x_{i+1} | ... | x_{N-1}] of
    shape (units, (N-1-i) * units) for i < N-1 (`Moments.update_joint`); examples read). The within-model cross
    sums x_i^T x_i are not computed: no method reads them (only the variances on their diagonals), so the
    products are (N-1)/(2N) of the whole Gram matrix's (2.5x fewer for 5 models). `_blocks` assembles the
    covariances. precision: as `Moments` (None: the enclosing `statistics_precision`; float32 sums are of
    values shifted by the first rows' per-unit means, the cross sums too, so covariances come from the
    shifted means: `Moments.shifted_mean_x`).
    Conv activations (B, C, H, W) count as B*H*W samples. Models run in eval mode, on at most `chunk` inputs
    at a time (every site of N models is held at once; the sums do not depend on it; None: whole batches;
    `align_many` sizes it by its memory budget). `graph`: the captured
    graph the sites' node names refer to (`spec.graph`).
    """
    moments = [Moments(precision=precision, models=len(models)) for _ in sites]
    seen, update = [0], _joint_update(sites, cross)
    with torch.no_grad(), eval_mode(*models):
        for acts in _joint_chunks(models, sites, data, max_examples, chunk, graph, seen):
            for k, m in enumerate(moments):
                update(m, acts, k)
            del acts
    return [m.all_reduce_() for m in moments], all_reduce_count(seen[0])


def _joint_chunks(models, sites, data, max_examples, chunk, graph, seen: list[int]) -> Iterator[list[list[torch.Tensor]]]:
    """Every model's activations at `sites` ([model][site]) per `chunk` inputs of this process's batches (the
    inputs read are counted in seen[0]; the consumer runs it in eval mode without gradients). A consumer
    deletes each chunk before asking for the next, so that one chunk's activations are held at a time."""
    taps = [SiteTaps(m, sites, graph, outputs=False) for m in models]
    for x in model_inputs(models[0], batches(data, max_examples, _device_of(models[0]))):
        seen[0] += batch_size(x)
        for start in range(0, batch_size(x), chunk or batch_size(x)):
            acts = [tap(take_rows(x, slice(start, start + chunk)) if chunk else x)[1] for tap in taps]
            yield acts
            del acts


def _joint_update(sites: list[Site], cross: bool):
    """update(m, acts, k): add site k of one chunk's activations [model][site] to m (`Moments.update_joint`)."""
    return lambda m, acts, k: m.update_joint([a[k] for a in acts], sites[k], cross)


def owned_joint_moments(
    models: Sequence[nn.Module], sites: list[Site], units: list[int], owners: list[int], data: Iterable,
    max_examples: int | None = 5000, cross: bool = True, chunk: int = 64, graph=None, precision: str | None = None,
) -> tuple[dict[int, Moments], int, int]:
    """`joint_moments` under torch.distributed with site ownership: site k (units[k] units per model) is held by
    rank owners[k] only (`owned_moments`), so each rank holds about 1 / world of the sums.

    Returns ({k: Moments} of the sites this rank owns, examples of all ranks, peak bytes of sums this rank held).
    """
    seen = [0]
    chunks = _joint_chunks(models, sites, data, max_examples, chunk, graph, seen)
    new = functools.partial(Moments, precision=precision, models=len(models))
    shapes = [joint_shapes(n, len(models), cross) for n in units]
    with torch.no_grad(), eval_mode(*models):
        mine, held = owned_moments(new, chunks, _joint_update(sites, cross), owners, shapes)
    return mine, all_reduce_count(seen[0]), held


def owned_moments(new, chunks: Iterator, update, owners: list[int], shapes: list[dict]) -> tuple[dict[int, Moments], int]:
    """Sums at K sites under torch.distributed with site ownership: site k's sums are held by rank owners[k] only.

    The ranks step through their `chunks` (this rank's activations, one chunk at a time) together; a rank whose
    chunks are done takes part with zeros. Per chunk and site, a fresh Moments `new()` takes update(m, chunk, k)
    about the shift all ranks agreed on from their first chunks (float32 precision: `agreed_shift`); its sums
    (names and shapes[k]) are reduced to the owner (`reduce_to_owner`), which adds them to its running sums.
    Returns ({k: Moments} of the sites this rank owns, peak bytes of sums held at once on this rank: the owned
    sums plus the largest per-chunk buffer).
    """
    rank = distributed()[0]
    mine = {k: new() for k, owner in enumerate(owners) if owner == rank}
    shifts, transient = [], 0
    while any_rank(acts := next(chunks, None)):
        for k, (owner, shape) in enumerate(zip(owners, shapes)):
            m = new()
            m.shift = dict(shifts[k]) if k < len(shifts) else {}
            if acts is not None:
                update(m, acts, k)
            if k == len(shifts):  # the first chunk: re-expressed about the shift all ranks agree on
                shifts.append(m._common_shift({n: shape[n][0] for n in ("x", "y") if n in shape}).shift)
            n, sums = reduce_to_owner(m, shape, owner)
            transient = max(transient, sum(t.nelement() * t.element_size() for t in sums.values()))
            if k in mine:
                mine[k].add_sums_(n, sums)
        del acts
    for k, m in mine.items():
        m.shift = dict(shifts[k]) if k < len(shifts) else {}
    return mine, sum(m.nbytes for m in mine.values()) + transient


def reduce_to_owner(m: Moments, shapes: dict[str, tuple[int, ...]], owner: int) -> tuple[int, dict[str, torch.Tensor]]:
    """(samples, sums named as `shapes`) of one chunk's Moments summed over all processes, on rank `owner` (a
    collective; a rank without some sum passes zeros): the count and the per-unit sums in one reduce, each matrix
    in one of its own. Only the owner's result is defined: on the other ranks the returned count and sums are
    unspecified (dist.reduce). `m` is consumed: its matrices are reduced in place (no copy where they already lie
    on the reduce device), so afterwards its sums are no longer this rank's chunk on any rank."""
    dev = reduce_device()

    def local(name):
        return m.sums[name].to(dev) if name in m.sums else torch.zeros(shapes[name], dtype=torch.float64, device=dev)

    vectors = [k for k, shape in shapes.items() if len(shape) == 1]
    vec = torch.cat([local(k) for k in vectors] + [torch.tensor([float(m.n)], dtype=torch.float64, device=dev)])
    dist.reduce(vec, dst=owner)
    out = dict(zip(vectors, vec[:-1].split([shapes[k][0] for k in vectors])))
    for k in [k for k in shapes if k not in out]:  # in the same order on every rank
        out[k] = local(k)
        dist.reduce(out[k], dst=owner)
    return int(vec[-1].item()), out
