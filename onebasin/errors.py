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


class InputMismatchError(OnebasinError):
    """An input does not fit the model: wrong dtype, device, shape, or an empty batch."""
