"""Shared fixtures: the real data folder (skipped when absent) and tiny synthetic image sets."""

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from onebasin.data import ImageData, dataset_info


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors: one intra-op thread is faster than two on a shared 2-core CPU (20x on convs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (MNIST, FashionMNIST in torchvision layout); skips the test when it is absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (path / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found at {path}")
    return path


def make_image_data(n=64, dataset="mnist", seed=0, image_size=None) -> ImageData:
    """n random uint8 images shaped like `dataset`'s, with labels cycling over its classes."""
    info = dataset_info(dataset)
    size = image_size or info.image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, info.channels, size, size), generator=g, dtype=torch.uint8)
    return ImageData(images, torch.arange(n) % info.num_classes, info)


@pytest.fixture
def tiny_data():
    """Factory fixture: tiny_data(n=64, dataset="mnist", seed=0, image_size=None) -> ImageData."""
    return make_image_data


def hooked_site_values(model, spec, x):
    """{site node: value} computed apart from onebasin's graph taps (an independent oracle).

    A layer site is its module's output, read with a forward hook. A residual-addition site is the add
    inside its module (e.g. a ResNet block): that module's input is read with a pre-hook and the module
    re-run by torch.fx's own interpreter, which reports the value of its (single) addition.
    """
    from onebasin.graph import module_path

    layer = {s.node: s.module for g in spec.groups.values() for s in g.sites if s.kind == "layer"}
    block = {s.node: module_path(spec.graph.node(s.node)) for g in spec.groups.values() for s in g.sites if s.kind == "block"}
    outputs, inputs, hooks = {}, {}, []
    for name in set(layer.values()):
        hooks.append(model.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: outputs.setdefault(n, o.detach().clone())))
    for name in set(block.values()):
        hooks.append(model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: inputs.setdefault(n, a)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    values = {node: outputs[name] for node, name in layer.items()}
    for node, name in block.items():
        values[node] = _fx_add_value(model.get_submodule(name), inputs[name])
    return values


def _fx_add_value(module, args):
    import operator

    import torch.fx

    gm = torch.fx.symbolic_trace(module)
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*args)
    adds = [n for n in gm.graph.nodes if n.target in (operator.add, operator.iadd, torch.add)]
    assert len(adds) == 1, f"the oracle needs one addition in {type(module).__name__}"
    return interp.env[adds[0]]


class CountConvs(TorchDispatchMode):
    """Counts the convolutions torch executes (however the network is run: modules, graphs, hooks)."""

    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.mkldnn_convolution)
        return func(*args, **(kwargs or {}))


class CountUses(TorchDispatchMode):
    """Counts the ops torch executes that read one given tensor (e.g. a model's first-layer weight)."""

    def __init__(self, tensor):
        super().__init__()
        self.ptr, self.n = tensor.data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for a in args if type(a) is torch.Tensor or type(a) is torch.nn.Parameter]  # not export's fake tensors
        self.n += func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.mm) and any(t.data_ptr() == self.ptr for t in flat)
        return func(*args, **(kwargs or {}))
