"""A network's computation as a functional ATen graph (torch.export), runnable on any weights.

`capture(model, example)` exports the model once (non-strict `torch.export`, which runs ordinary Python
such as `len(x)` or Hugging Face forward signatures on the example) and removes in-place ops
(`run_decompositions({})`: every node's value is final when computed, so a tapped tensor can never be
overwritten later). Weights are graph inputs named by their state_dict keys, so one capture runs model
A, model B and any interpolation of them: `captured.run(state_dict, inputs, taps=[node names])` is a
pure function of the weights. `spec.trace` reads the permutation structure from the same graph, and
the statistics and REPAIR read activations at its nodes.

The batch axis is exported as dynamic where the model allows it; a model that fixes it (`x.view(2, -1)`,
`len(x)` in a shape) is re-exported for each batch size it is run on (`for_batch`), with the same nodes.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from ._functionalize import functionalize
from .checks import check_example_input, eval_mode
from .errors import InputMismatchError, UntraceableModelError

StateDict = dict[str, torch.Tensor]


def as_call(example) -> tuple[tuple, dict]:
    """(args, kwargs) of a model call: a tensor is one positional input, a tuple several, a dict keyword inputs."""
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def batch_size(example) -> int:
    """Rows of the first tensor of an input (tensor, tuple or dict of tensors)."""
    args, kwargs = as_call(example)
    first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
    if first is None or first.ndim == 0:
        raise InputMismatchError("the model input holds no batched tensor")
    return first.shape[0]


def take_rows(example, rows: slice | torch.Tensor):
    """The same input structure with every batched tensor indexed by `rows` along axis 0."""
    n = batch_size(example)
    return pytree.tree_map(lambda t: t[rows] if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == n else t, example)


def to_device(example, device):
    """The input structure moved to `device` (tensors only)."""
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, example)


def _dynamic_batch(model: nn.Module, args: tuple, kwargs: dict):
    """dynamic_shapes for torch.export: axis 0 of every input tensor may vary (Dim.AUTO), nothing else.
    Positional inputs only: a tuple; with keyword inputs: a dict by the forward's argument names."""
    spec = lambda t: {0: Dim.AUTO} if isinstance(t, torch.Tensor) and t.ndim else None  # noqa: E731
    if not kwargs:
        return tuple(spec(a) for a in args)
    names = list(inspect.signature(model.forward).parameters)
    return {**{names[i]: spec(a) for i, a in enumerate(args)}, **{k: spec(v) for k, v in kwargs.items()}}


def _where(err: BaseException) -> str:
    """' at file:line `code`' of the innermost frame outside torch (the user's model code), or ''."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename and "/onebasin/" not in f.filename]
    return f" at {frames[-1].filename}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""


@contextlib.contextmanager
def _quiet():
    """Silence torch.export's warnings and logs (its failures become one onebasin error instead)."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.export", "torch._export", "torch.fx", "torch._dynamo",
                                              "torch.fx.experimental.symbolic_shapes", "torch._subclasses")]  # fmt: skip
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> ExportedProgram:
    # inputs as tensors of their own: export guards a view on its base's shape, which a later input never has
    args, kwargs = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))
    with _quiet():
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic_batch(model, args, kwargs) if dynamic else None, strict=False)
        return ep if functionalize(ep.graph_module) else ep.run_decompositions({})


def _names_by_tensor(model: nn.Module) -> dict[int, list[str]]:
    """id of each parameter/buffer -> every state_dict key that holds it (tied weights have several)."""
    out: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        out.setdefault(id(t), []).append(name)
    return out


@dataclass
class Captured:
    """One exported graph of a model and how to feed it: placeholders <-> state_dict keys and user inputs."""

    model: nn.Module = field(repr=False)
    program: ExportedProgram = field(repr=False)
    example: object = field(repr=False)  # the example input it was exported on
    batch: int | None  # None: any batch size; else the only batch size this graph runs
    keys: dict[str, str]  # placeholder name -> state_dict key of its parameter or buffer
    aliases: dict[str, tuple[str, ...]]  # state_dict key -> all keys holding the same tensor (tied weights)
    _runners: dict = field(default_factory=dict, repr=False)
    _by_batch: dict = field(default_factory=dict, repr=False)
    _module: nn.Module | None = field(default=None, repr=False)

    def module(self) -> nn.Module:
        """A new nn.Module running this graph with its own copy of the weights (torch.export's unlifted
        module, built once per capture (~80 ms for a small ViT) and deep-copied for each caller)."""
        if self._module is None:
            self._module = self.program.module()
        return copy.deepcopy(self._module)

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph_module.graph

    def node(self, name: str) -> fx.Node:
        """The graph node called `name`."""
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in the captured graph")

    def user_outputs(self) -> list[fx.Node]:
        """The nodes of the model's own outputs (not mutated buffers), in output order."""
        out = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        specs = self.program.graph_signature.output_specs
        return [a for a, s in zip(out.args[0], specs) if s.kind == OutputKind.USER_OUTPUT and isinstance(a, fx.Node)]

    def flat_inputs(self, state: Mapping[str, torch.Tensor], inputs) -> list:
        """The graph module's positional inputs: weights from `state` (constants from the capture), then user inputs."""
        args, kwargs = as_call(inputs)
        user = iter(pytree.tree_leaves((args, kwargs)))
        flat = []
        for spec in self.program.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                flat.append(next(user))
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.persistent is not False:
                flat.append(state[spec.target] if spec.target in state else self.program.state_dict[spec.target])
            else:
                flat.append(self.program.constants[spec.target])
        return flat

    def runner(self, taps: Sequence[str], outputs: bool = True) -> fx.GraphModule:
        """A GraphModule returning (user outputs..., tapped nodes...) (or only the taps, computing just what they need)."""
        key = (tuple(taps), outputs)
        if key not in self._runners:
            gm = self.program.graph_module
            graph, env = fx.Graph(), {}
            graph.graph_copy(gm.graph, env)
            by_name = {n.name: n for n in gm.graph.nodes}
            outs = [env[n] for n in self.user_outputs()] if outputs else []
            graph.output(tuple(outs + [env[by_name[t]] for t in taps]))
            runner = fx.GraphModule(gm, graph)
            runner.graph.eliminate_dead_code()
            runner.recompile()
            self._runners[key] = runner
        return self._runners[key]

    def paired_runner(self, taps: Sequence[str]) -> fx.GraphModule:
        """A GraphModule of two weight sets on one input: (*A's flat inputs, *B's flat inputs, visit) -> None. The two
        copies of the graph run node by node side by side, and at the k-th tapped node it calls visit(k, a, b) with
        A's and B's values there, as soon as both exist; like every value they are freed after their last reader,
        so a tapped activation lives no longer than in an eager forward (not to the end of the pass)."""
        key = ("paired", tuple(taps))
        if key not in self._runners:
            base = self.runner(taps, outputs=False)  # only what the taps need
            nodes = list(base.graph.nodes)
            out = next(n for n in nodes if n.op == "output")
            tapped: dict[fx.Node, list[int]] = {}
            for k, node in enumerate(out.args[0]):
                tapped.setdefault(node, []).append(k)
            graph, env_a, env_b = fx.Graph(), {}, {}
            inputs = [n for n in nodes if n.op == "placeholder"]
            for env, suffix in ((env_a, "_a"), (env_b, "_b")):
                for n in inputs:
                    env[n] = graph.placeholder(n.name + suffix)
            visit = graph.placeholder("visit")
            for n in nodes:
                if n.op in ("placeholder", "output"):
                    continue
                env_a[n] = graph.node_copy(n, lambda x: env_a[x])
                env_b[n] = graph.node_copy(n, lambda x: env_b[x])
                for k in tapped.get(n, []):
                    graph.call_function(_visit, (visit, k, env_a[n], env_b[n]))
            graph.output(None)
            self._runners[key] = fx.GraphModule(base, graph)
        return self._runners[key]

    def run_paired(self, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], inputs,
                   taps: Sequence[str], visit) -> None:
        """Run the graph with weights `state_a` and `state_b` on the same `inputs`, calling visit(k, a, b) with both
        values at taps[k] as they are computed (`paired_runner`; no autograd graph kept)."""
        graph = self.for_batch(batch_size(inputs))
        with torch.no_grad():
            graph.paired_runner(taps)(*graph.flat_inputs(state_a, inputs), *graph.flat_inputs(state_b, inputs), visit)

    def run(self, state: Mapping[str, torch.Tensor], inputs, taps: Sequence[str] = (), outputs: bool = True) -> list:
        """[user outputs..., tensors at `taps`...] of the model with weights `state` on `inputs` (no autograd graph kept)."""
        graph = self.for_batch(batch_size(inputs))
        with torch.no_grad():
            return list(graph.runner(taps, outputs)(*graph.flat_inputs(state, inputs)))

    def for_batch(self, n: int) -> "Captured":
        """This capture, or (for a model whose graph fixes the batch size) one exported at batch size `n`."""
        if self.batch is None or self.batch == n:
            return self
        if n not in self._by_batch:
            rows = torch.arange(n) % batch_size(self.example)
            other = capture(self.model, take_rows(self.example, rows))
            mine = [(x.name, str(x.target)) for x in self.graph.nodes]
            if [(x.name, str(x.target)) for x in other.graph.nodes] != mine:
                raise UntraceableModelError(
                    f"{type(self.model).__name__} fixes its batch size ({self.batch}) and exports to a different graph at batch "
                    f"size {n}; feed batches of {self.batch} examples"
                )
            self._by_batch[n] = other
        return self._by_batch[n]


def _visit(fn, k: int, a, b) -> None:
    """A paired runner's call of its visitor at tap k (a graph node: `fn` is the runner's last input)."""
    fn(k, a, b)


def capture(model: nn.Module, example) -> Captured:
    """Export `model` (in eval mode) on `example` into a functional ATen graph.

    Args:
        model: any nn.Module; exported in eval mode, each submodule's mode restored afterwards (and a Hugging
            Face causal LM without its key/value cache: `without_cache`).
        example: the model's input: a tensor (N, ...), a tuple of positional inputs, or a dict of keyword
            inputs (e.g. {"input_ids": (N, T) LongTensor}); N >= 2 keeps the batch axis dynamic.
    Returns:
        Captured graph; `run(state_dict, inputs, taps)` evaluates it.
    Raises:
        InputMismatchError: the input's dtype, device or shape does not fit the model (one eager forward,
            `checks.check_example_input`, before anything is exported).
        UntraceableModelError: torch.export cannot follow the model (names the error and the user's source line).
    """
    check_example_input(model, example)
    args, kwargs = as_call(example)
    with eval_mode(model), without_cache([model]):
        try:
            try:
                program = _export(model, args, kwargs, dynamic=True)
            except Exception:  # some models refuse a dynamic batch axis: export at the example's batch size
                program = _export(model, args, kwargs, dynamic=False)
        except Exception as err:  # export raises many types (UserError, RuntimeError, TypeError, ...)
            _raise_untraceable(model, err)
    return _captured(model, program, example)


@contextlib.contextmanager
def without_cache(models: Iterable[nn.Module]):
    """Each model's config with use_cache=False inside the block, restored after (a Hugging Face causal LM
    saved with use_cache=True, the default of from_pretrained): a key/value cache is no tensor output that
    torch.export can follow ("Found DynamicCache in output"), and no statistic needs one."""
    saved = [(m.config, m.config.use_cache) for m in models if getattr(getattr(m, "config", None), "use_cache", None)]
    for config, _ in saved:
        config.use_cache = False
    try:
        yield
    finally:
        for config, value in saved:
            config.use_cache = value


def _raise_untraceable(model: nn.Module, err: Exception):
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    raise UntraceableModelError(
        f"cannot trace {type(model).__name__} with torch.export{_where(err)}: {type(err).__name__}: {first}. "
        "Write the permutation spec by hand with onebasin.spec.from_groups(...), or make that code traceable."
    ) from None


def _captured(model: nn.Module, program: ExportedProgram, example) -> Captured:
    sig = program.graph_signature
    keys = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    by_tensor = _names_by_tensor(model)
    sd = model.state_dict(keep_vars=True)
    aliases = {k: tuple(by_tensor.get(id(sd[k]), [k])) for k in keys.values() if k in sd}
    user = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in sig.user_inputs]
    static = any(isinstance(n.meta["val"], torch.Tensor) and n.meta["val"].ndim and isinstance(n.meta["val"].shape[0], int) for n in user)
    return Captured(model, program, example, batch_size(example) if static else None, keys, aliases)


def concrete(size) -> int:
    """An int for a (possibly symbolic) size: the example's value of a dynamic axis."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else int(size)


def shape_of(node) -> tuple[int, ...] | None:
    """Concrete shape of a graph node's tensor value (None if it is not a tensor)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(concrete(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def module_path(node: fx.Node) -> str | None:
    """The state_dict prefix of the module that made `node` (from export's nn_module_stack), or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").removeprefix("L__self__.") or None


def inputs_like(captured: Captured, batches: Iterable) -> Iterable:
    """Each batch's model input (the x of an (x, y) pair) moved to the capture's device and floating dtype."""
    return model_inputs(captured.model, batches)


def model_inputs(model: nn.Module, batches: Iterable) -> Iterable:
    """Each batch's model input (the x of an (x, y) pair) moved to the model's device and floating dtype."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield pytree.tree_map(lambda t: t.to(p.device, p.dtype) if p is not None and isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)


def _ancestors(nodes: list[fx.Node], targets: set[str]) -> set[str]:
    """Names of the nodes that `targets` depend on (themselves included)."""
    by_name = {n.name: n for n in nodes}
    need, stack = set(), [by_name[t] for t in targets]
    while stack:
        n = stack.pop()
        if n.name not in need:
            need.add(n.name)
            stack.extend(n.all_input_nodes)
    return need


def _unshared(env: dict, name: str):
    """env[name], copied if its memory is shared with another value of env (so a callback may write into it)."""
    v = env[name]
    if isinstance(v, torch.Tensor):
        ptr = v.untyped_storage().data_ptr()
        if any(k != name and isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() == ptr for k, o in env.items()):
            v = env[name] = v.clone()
    return v


def _nbytes(values: Iterable) -> int:
    seen, total = set(), 0
    for v in values:
        if isinstance(v, torch.Tensor):
            storage = v.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


_aten = torch.ops.aten
_IN_PLACE = {_aten.relu.default: _aten.relu_.default, _aten.add.Tensor: _aten.add_.Tensor}
_FRESH = {_aten.conv2d.default, _aten.convolution.default, _aten.batch_norm.default, _aten.linear.default,
          _aten.addmm.default, _aten.mm.default, _aten.layer_norm.default, _aten.relu.default, _aten.add.Tensor,
          _aten.mul.Tensor, _aten.gelu.default}  # ops whose result is always a new tensor (never a view)


def _in_place(nodes: list[fx.Node]) -> dict[int, object]:
    """{index of a node: its in-place op} for the ReLUs and additions whose first operand is the fresh result
    of another op (`_FRESH`) read by this node only, of the result's shape and dtype: writing into it changes
    no value any other node reads."""
    out = {}
    for i, n in enumerate(nodes):
        a = n.args[0] if n.op == "call_function" and n.target in _IN_PLACE and n.args else None
        if not (isinstance(a, fx.Node) and a.op == "call_function" and a.target in _FRESH and list(a.users) == [n]):
            continue
        va, vn = a.meta.get("val"), n.meta.get("val")
        if isinstance(va, torch.Tensor) and isinstance(vn, torch.Tensor) and va.dtype == vn.dtype and shape_of(a) == shape_of(n):
            out[i] = _IN_PLACE[n.target]
    return out


def walk(captured: Captured, state: Mapping[str, torch.Tensor], inputs: list, stop: Iterable[str], visit=None) -> int:
    """Evaluate the graph node by node over several input chunks at once, up to the nodes `stop`.

    At each node named in `visit` (a dict: node name -> fn(values) -> values, `values` the node's
    tensors for all chunks), the callback may read and replace them (measure a site's statistics over
    all chunks, then correct it) before any later node reads them; it may also change them in place:
    a value that shares memory with another live value (a view, an input passed through) is copied
    before the callback sees it. The values a callback returns are the walk's: like every value, they
    are dropped after their last reader, and a ReLU or an addition that is the only reader of a freshly
    computed value writes its result into that value (`_in_place`: as the eager ResNet's relu_ and +=
    do, no new activation-sized block). Nodes not needed for `stop` are skipped. Returns the peak bytes
    of live activations.
    This is how exact REPAIR corrects every site in one forward sweep (onebasin.repair).
    """
    visit = visit or {}
    graphs = [captured.for_batch(batch_size(x)) for x in inputs]
    lists = [list(g.graph.nodes) for g in graphs]
    ref = lists[0] if lists else list(captured.graph.nodes)  # no input (a rank without data): visits still run
    stop = set(stop)
    need = _ancestors(ref, stop)
    last_use = {a.name: i for i, n in enumerate(ref) for a in n.all_input_nodes}
    in_place = _in_place(ref)
    flat = [iter(g.flat_inputs(state, x)) for g, x in zip(graphs, inputs)]
    env: list[dict] = [{} for _ in inputs]
    peak, remaining = 0, set(stop)
    with torch.no_grad():
        for i, n in enumerate(ref):
            if n.op == "placeholder":
                for c in range(len(inputs)):
                    value = next(flat[c])
                    if n.name in need:
                        env[c][n.name] = value
                continue
            if n.name not in need or n.op != "call_function":
                continue
            for c, e in enumerate(env):
                node = lists[c][i]
                args = fx.node.map_arg(node.args, lambda a, e=e: e[a.name])
                kwargs = fx.node.map_arg(node.kwargs, lambda a, e=e: e[a.name])
                e[n.name] = in_place.get(i, node.target)(*args, **kwargs)
            peak = max(peak, sum(_nbytes(v for k, v in e.items() if k not in captured.keys) for e in env))
            for a in n.all_input_nodes:  # before the visit: a dead input no longer forces a copy in _unshared
                if last_use.get(a.name) == i:
                    for e in env:
                        e.pop(a.name, None)
            if n.name in visit:
                for e, v in zip(env, visit[n.name]([_unshared(e, n.name) for e in env])):
                    e[n.name] = v
            remaining.discard(n.name)
            if not remaining:
                break
    return peak


def describe_input(example) -> dict:
    """JSON-ready shapes and dtypes of a model input (to rebuild an example with `example_from`)."""
    args, kwargs = as_call(example)
    one = lambda t: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}  # noqa: E731
    if kwargs:
        return {"kwargs": {k: one(v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}}
    return {"args": [one(a) for a in args if isinstance(a, torch.Tensor)]}


def example_from(desc: dict):
    """An input of the described shapes and dtypes (zeros; integer inputs hold token id 0)."""
    make = lambda d: torch.zeros(d["shape"], dtype=getattr(torch, d["dtype"]))  # noqa: E731
    if "kwargs" in desc:
        return {k: make(d) for k, d in desc["kwargs"].items()}
    args = [make(d) for d in desc["args"]]
    return args[0] if len(args) == 1 else tuple(args)
