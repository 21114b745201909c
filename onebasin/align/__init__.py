"""Alignment: find the permutations of model B's hidden units that move it into model A's basin.

    permuted_b, result = align(model_a, model_b, method="activation", data=loader)
    result.perms      # {group: LongTensor}, apply_perms(spec, result.perms, sd_b) ~ sd_a
    result.record     # method, iterations, objective values, seconds, examples

Methods (a registry: `list_methods()`, `get_method(name)`; each `fn(spec, model_a, model_b, data, **options)`):

* "activation": Li et al. 2015, correlation of unit activations, one pass over the data.
* "weight": Ainsworth et al. 2022, coordinate descent on weight inner products, no data.
* "annealing": Entezari et al. 2021, simulated annealing on the barrier (`anneal_many` for n >= 2 models).
* "functional": He et al. 2018, functional difference with layer-input Hessians, one pass over the data.
* "orthogonal": Theus et al. 2025, permutations plus an orthogonal map of the residual stream (pre-norm
  transformers); it also rewrites A (result.models).
* "learned": Ainsworth et al. 2023 Sec. 3.3 / Theus et al. 2025, permutations (and the stream's orthogonal
  map) trained by a straight-through estimator on the interpolated network's loss, from another method's result.

Statistics are exact float64 sums: under torch.distributed each rank reads its shard and the sums are
all-reduced before any assignment, giving the single-process result.
"""

from ._registry import AlignmentError, AlignResult, Method, get_method, list_methods, register_method
from .activation import activation_matching, correlation_matrix, site_moments
from .annealing import anneal_many, annealing
from .functional import functional_matching, input_moments
from .weight import weight_matching
from .orthogonal import orthogonal_alignment
from .learned import learned_matching
from ._align import align, check_same_function

__all__ = [
    "AlignResult",
    "AlignmentError",
    "Method",
    "activation_matching",
    "align",
    "anneal_many",
    "annealing",
    "check_same_function",
    "correlation_matrix",
    "functional_matching",
    "get_method",
    "input_moments",
    "learned_matching",
    "list_methods",
    "orthogonal_alignment",
    "register_method",
    "site_moments",
    "weight_matching",
]
