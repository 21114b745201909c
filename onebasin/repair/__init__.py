"""REPAIR (Jordan et al. 2022): renormalise the hidden units of an interpolated network, and BN reset.

An interpolated network theta_alpha = (1 - alpha) theta_A + alpha theta_B suffers *variance collapse*:
its hidden units vary less over the data than the same units of A and B (Sec. 3). REPAIR (Sec. 4) gives
every selected unit the statistics of eqs. (3)-(4),

    E[X_alpha] = (1 - alpha) E[X_A] + alpha E[X_B],    std(X_alpha) = (1 - alpha) std(X_A) + alpha std(X_B),

with a per-unit affine correction y -> scale * y + shift applied at the spec's sites: kind "layer"
(output of a Linear/Conv, or of the norm right after it) and kind "block" (output of a residual addition),
the default; kind "norm" (output of any other norm, e.g. a pre-norm transformer's LayerNorms) is chosen
for LayerNorm networks: ("layer", "norm") corrections all fold into weights and norms.

* `method="exact"` (Sec. 4.2) measures the interpolated network's statistics on calibration data with
  every earlier correction in place. It makes ONE forward sweep over the calibration set: the graph is
  evaluated node by node for the whole set at once (`onebasin.graph.walk`); at each site, in forward
  order, the statistics of all calibration examples are taken, the correction computed and applied to
  the kept tensor, and the sweep moves on (as GPTQ calibrates quantisation). Exact float64 sums, so the
  corrected statistics match the goals to rounding. The kept tensors take memory (the live activations
  of the whole calibration set); over `max_memory` it falls back to one streaming pass per dependency
  level (a site's level is 1 + that of the deepest corrected site upstream), with the same result.
* `method="closed"` (Sec. 4.1, eq. 5) predicts std(X_alpha) = sqrt((1-a)^2 Var_A + a^2 Var_B + 2a(1-a) Cov_AB)
  and E[X_alpha] = (1-a) E[X_A] + a E[X_B] from the endpoints alone: no pass over the interpolated net.
  Exact for sites whose input does not depend on other hidden units (the first layer); an approximation
  deeper (measure how far with `repair_errors`).

Fusion. A correction after a Linear/Conv output folds into its weight and bias; after a norm layer
(BatchNorm, LayerNorm, GroupNorm with affine parameters) into the norm's weight and bias (for BatchNorm
nets this is BN reset, Sec. 5.2). The result is then an instance of the original class. A correction
cannot be folded, and stays as a `RepairAffine` module named `repair_<node>`, when it follows a residual
addition (the identity shortcut carries an upstream tensor that other layers also read), a layer without
bias or a norm without affine bias (the shift has nowhere to go), or a weight used more than once. The
model is then a `torch.fx.GraphModule` named `Repaired<Class>` (the exported graph of the model: the
original parameters under their state_dict keys, plus those modules).
All statistics are taken in eval mode (BatchNorm uses its running statistics, dropout is off).

Modules, one job each: `sites` (which nodes are corrected), `affine` (the per-unit map y -> scale * y +
shift), `measure` (statistics and goals), `sweep` (exact corrections: one sweep or one pass per level),
`fuse` (folding, saving/reloading unfolded corrections), `bn` (`reset_bn`), `api` (`repair`, `correct`),
`many` (N-way REPAIR: `repair_many`).
"""

from .affine import RepairAffine, affine, affine_to_goal
from .api import METHODS, RepairResult, SiteRepair, correct, repair, repair_errors
from .bn import reset_bn
from .fuse import fuse_corrections, restore_affines, with_affines
from .measure import Corrected, EndpointStats, as_corrected, endpoint_stats, endpoints_from_alignment, site_moments, site_stats
from .sites import ALL_KINDS, KINDS, select_sites
from .sweep import exact_corrections, levels

__all__ = [
    "ALL_KINDS", "KINDS", "METHODS", "Corrected", "EndpointStats", "RepairAffine", "RepairResult", "SiteRepair",
    "affine", "affine_to_goal", "as_corrected", "correct", "endpoint_stats", "endpoints_from_alignment",
    "exact_corrections", "fuse_corrections", "levels", "repair", "repair_errors", "reset_bn", "restore_affines",
    "select_sites", "site_moments", "site_stats", "with_affines",
]  # fmt: skip
