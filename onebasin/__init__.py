"""onebasin: merge independently trained networks by permutation alignment, interpolation and REPAIR.

The public surface is what this module exports; everything else may change. The subpackages
`onebasin.align` (`align.align`, the method registry), `onebasin.repair` (`repair.repair`) and
`onebasin.train` keep their own names: their main functions are not re-exported here, so that the
modules stay reachable as attributes.

    import onebasin
    spec = onebasin.trace(model_a, example_input)              # permutation groups, via torch.fx
    merged, result = onebasin.merge(model_a, model_b, method="activation", repair="exact", data=loader)
    comparison = onebasin.compare(model_a, model_b, {"test": test_loader}, calib_loader)
"""

from ._version import __version__

from .align import AlignResult, anneal_many, get_method, list_methods, register_method
from .align.many import align_many, list_combiners, register_combiner
from .barrier import barrier_curve
from .checkpoint import CheckpointError, load_any, load_checkpoint, load_model, save_checkpoint
from .data import DataNotFoundError, biased_split, dataset_info, load_dataset
from .diagnostics import variance_ratios
from .errors import (
    ArchitectureMismatchError,
    InvalidWeightsError,
    OnebasinError,
    UnsupportedOpError,
    UntraceableModelError,
)
from .experiment import Experiment, run_experiment
from .interpolate import BarrierCurve, interpolate_model, lerp
from .models import build_model, create_model, list_models, register_model
from .permute import apply_perms, compose_perms, identity_perms, invert_perms, permute_model, random_perms
from .comparison import Comparison, compare
from .pipeline import ManyResult, MergeResult, merge, merge_many
from .repair import RepairResult, reset_bn
from .spec import Group, Member, PermutationSpec, Site, from_groups, trace
from .sweep import run_sweep
from .train import get_recipe, train_model

__all__ = [
    "AlignResult", "ArchitectureMismatchError", "BarrierCurve", "CheckpointError", "Comparison",
    "DataNotFoundError", "Experiment", "Group", "InvalidWeightsError", "Member", "MergeResult",
    "OnebasinError", "PermutationSpec", "RepairResult", "Site", "UnsupportedOpError",
    "UntraceableModelError", "anneal_many", "apply_perms", "barrier_curve", "biased_split",
    "build_model", "compare", "compose_perms", "create_model", "dataset_info", "from_groups",
    "get_method", "get_recipe", "identity_perms", "interpolate_model", "invert_perms", "lerp",
    "list_methods", "list_models", "load_any", "load_checkpoint", "load_dataset", "load_model", "merge",
    "merge_many", "ManyResult", "align_many", "list_combiners", "register_combiner",
    "permute_model", "random_perms", "register_method", "register_model", "reset_bn",
    "run_experiment", "run_sweep", "save_checkpoint", "trace", "train_model", "variance_ratios",
]  # fmt: skip
