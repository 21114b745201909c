"""Every error onebasin raises on purpose: one base class, one subclass per kind of bad input."""


class OnebasinError(Exception):
    """Base class: catch this to handle any onebasin error (the CLI turns it into exit code 2)."""


class UntraceableModelError(OnebasinError):
    """torch.fx could not trace the model (e.g. data-dependent control flow)."""


class UnsupportedOpError(OnebasinError):
    """An operation touches a permuted axis in a way onebasin cannot permute correctly."""


class ArchitectureMismatchError(OnebasinError):
    """Two models (or state_dicts) differ in keys or shapes."""


class InvalidWeightsError(OnebasinError):
    """Weights contain NaN or infinite values."""


class InvalidOptionError(OnebasinError, ValueError):
    """An option has an unknown name or a bad value (method, repair, dataset, alpha, a sweep's grid...)."""


class InputMismatchError(OnebasinError):
    """The example input does not fit the model (shape, dtype, device): names the model class and the input."""


class EmptyDataError(InputMismatchError):
    """The data holds no batch, or a batch with no rows."""


class DatasetMismatchError(OnebasinError):
    """Two checkpoints were trained on different datasets."""


class OutputError(OnebasinError):
    """An output cannot be written without losing files onebasin did not write (or an input)."""
