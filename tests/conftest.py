"""Shared fixtures: the real data folder (skipped when absent), tiny synthetic image sets, hooked-activation
oracles, and a gloo process group to run a function on several ranks."""

import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from onebasin.data import ImageData, dataset_info
from onebasin.stats import current_precision, statistics_precision


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors: one intra-op thread is faster than two on a shared 2-core CPU (20x on convs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def float64_statistics():
    """Every statistic of the test in float64 (`stats.statistics_precision`): for the tests that hold onebasin's
    sums to numpy at 1e-10, which only the exact path can meet. The default, float32, is held to float64 (to
    ~1e-6) in test_precision.py."""
    with statistics_precision("float64"):
        yield


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


def hooked_site_values(model, spec, x, sites=None):
    """{site node: value} computed apart from onebasin's graph taps (an independent oracle).

    `sites`: the spec's layer and block sites by default. A layer (or norm) site is its module's output,
    read with a forward hook (a copy: later in-place ops do not reach it). A residual-addition site is the
    add inside its module (e.g. a ResNet block, or the root module): that module's input is read with a
    pre-hook and the module re-run by torch.fx's own interpreter, which reports the value of its (single)
    addition.
    """
    from onebasin.graph import module_path

    sites = sites if sites is not None else [s for g in spec.groups.values() for s in g.sites if s.kind in ("layer", "block")]
    layer = {s.node: s.module for s in sites if s.kind != "block"}
    block = {s.node: module_path(spec.graph.node(s.node)) or "" for s in sites if s.kind == "block"}
    outputs, inputs, hooks = {}, {}, []

    def keep_output(name):
        def hook(module, args, output):  # returns None: a returned value would replace the module's output
            outputs.setdefault(name, output.detach().clone())

        return hook

    def keep_input(name):
        def hook(module, args):
            inputs.setdefault(name, args)

        return hook

    for name in set(layer.values()):
        hooks.append(model.get_submodule(name).register_forward_hook(keep_output(name)))
    for name in set(block.values()):
        hooks.append(model.get_submodule(name).register_forward_pre_hook(keep_input(name)))
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
    """The value of the module's single addition, copied when computed (a later in-place op, e.g.
    ReLU(inplace=True) after `out += x`, does not reach it)."""
    import operator

    import torch.fx

    gm = torch.fx.symbolic_trace(module)
    adds = [n for n in gm.graph.nodes if n.target in (operator.add, operator.iadd, torch.add)]
    assert len(adds) == 1, f"the oracle needs one addition in {type(module).__name__}"
    seen = {}

    class Keep(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is adds[0]:
                seen["add"] = out.detach().clone()
            return out

    with torch.no_grad():
        Keep(gm).run(*args)
    return seen["add"]


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


def _gloo_rank(rank: int, world: int, init_file: str, out_dir: str, fn, args, precision: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with statistics_precision(precision):
            torch.save(fn(*args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def gloo_results(fn, *args, world: int = 2) -> list:
    """[fn(*args) on rank r for r < world] of a gloo group of `world` spawned processes (fn: a module-level
    function of a test module; its result is saved by each rank with torch.save). Each rank computes its
    statistics in the calling test's precision (`float64_statistics` reaches the spawned processes too)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_gloo_rank, args=(world, str(Path(tmp) / "init"), tmp, fn, args, current_precision()),
                           nprocs=world, start_method="spawn")
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
