"""A copy of a model that will receive new weights (permuted, interpolated, repaired), refusing hooks that
would keep reading the original's tensors."""

from __future__ import annotations

import copy
import types

import torch.nn as nn

from .errors import UnsupportedOpError


def copy_module(model: nn.Module) -> nn.Module:
    """`copy.deepcopy(model)`, refused when a forward hook of the model reads one of its tensors or modules
    through a closure, a default or a global: deepcopy keeps a plain function as it is, so the copy's hook
    would read the original (its output then ignores the copy's new weights). Raises UnsupportedOpError
    naming the module, the hook and what it reads."""
    owned = {id(model): f"root module ({type(model).__name__})"}
    owned.update({id(m): f"module {n!r}" for n, m in model.named_modules(remove_duplicate=False) if n})
    owned.update({id(t): f"parameter {n!r}" for n, t in model.named_parameters(remove_duplicate=False)})
    owned.update({id(t): f"buffer {n!r}" for n, t in model.named_buffers(remove_duplicate=False)})
    for name, module in model.named_modules():
        for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
            if read := _reads(hook, owned):
                where = f"module {name!r}" if name else type(model).__name__
                raise UnsupportedOpError(
                    f"the forward hook {getattr(hook, '__qualname__', hook)!r} of {where} reads the original model's "
                    f"{read} through a closure, default or global: a permuted or merged copy would still read the "
                    f"original's; read it through the hook's module argument instead, or remove the hook before merging"
                )
    return copy.deepcopy(model)


def module_with(model: nn.Module, state: dict) -> nn.Module:
    """A copy of `model` (`copy_module`: hooks checked) holding the state_dict `state`; `model` is untouched."""
    out = copy_module(model)
    out.load_state_dict(state)
    return out


def _reads(fn, owned: dict[int, str]) -> str | None:
    """What a plain function (deepcopy shares it) captures of `owned`: closure cells, defaults, globals it names."""
    if not isinstance(fn, types.FunctionType):
        return None  # bound methods, partials and callable objects are deep-copied with the model
    seen = [x for c in fn.__closure__ or () for x in _contents(c)]
    seen += [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]
    seen += [fn.__globals__[n] for n in fn.__code__.co_names if n in fn.__globals__]
    for obj in seen:
        for item in (obj, *(obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ())):
            if id(item) in owned:
                return owned[id(item)]
    return None


def _contents(cell) -> list:
    try:
        return [cell.cell_contents]
    except ValueError:  # an empty cell (a variable not yet assigned)
        return []


def untie_parameters(model: nn.Module, keys: list[str]) -> nn.Module:
    """`model` with each parameter of `keys` given its own copy, in place (the other keys that held it keep the
    original): e.g. an LM head tied to the embedding, untied."""
    for key in keys:
        path, _, name = key.rpartition(".")
        module = model.get_submodule(path)
        setattr(module, name, nn.Parameter(getattr(module, name).detach().clone()))
    return model
