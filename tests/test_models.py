"""The model zoo: every registered model builds, has the right output shape, traces, and permutes."""

import inspect

import pytest
import torch
import torch.nn as nn

from onebasin.data import dataset_info
from onebasin.models import create_model, data_kwargs, list_models, model_info, register_model

SMALL_WIDTH = {"vgg11": 0.125, "vgg13": 0.125, "vgg16": 0.125, "vgg19": 0.125, "resnet18_cifar": 0.25,
               "resnet50": 0.25, "vit": 32, "gpt": 32}
SMALL_DEPTH = {"vit": 2, "gpt": 2}  # the default configs: tests/test_transformers_zoo.py


def build(name, dataset=None, **kwargs):
    """Model `name` sized for `dataset` (default: the one the paper trains it on), and an input batch:
    (2, C, H, W) images, or (2, 16) token ids for a model of tokens."""
    info = dataset_info(dataset or model_info(name).default_dataset)
    if name in SMALL_WIDTH:
        kwargs.setdefault("width", SMALL_WIDTH[name])
    if name in SMALL_DEPTH:
        kwargs.setdefault("depth", SMALL_DEPTH[name])
    torch.manual_seed(0)
    model = create_model(name, **kwargs, **data_kwargs(name, info))
    if model_info(name).tokens:
        return model, torch.randint(0, info.vocab_size, (2, 16)), info
    size = model_info(name).image_size or info.image_size
    return model, torch.randn(2, info.channels, size, size), info


def test_registry_holds_the_papers_models():
    assert set(list_models()) >= {"mlp", "vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet18_cifar",
                                  "resnet18", "resnet50", "vit", "gpt"}
    assert list_models("vgg*") == ["vgg11", "vgg13", "vgg16", "vgg19"]


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*resnet20"):
        create_model("resnet21")


@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_num_classes_and_an_input_size(name):
    params = inspect.signature(model_info(name).fn).parameters
    if model_info(name).tokens:
        assert {"vocab_size", "block_size"} <= set(params)
        return
    assert "num_classes" in params
    assert ("in_features" in params) if model_info(name).flat_input else ("in_channels" in params)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_on_default_dataset(name):
    model, x, info = build(name)
    expected = (2, x.shape[1], info.vocab_size) if model_info(name).tokens else (2, info.num_classes)
    assert model.eval()(x).shape == expected


@pytest.mark.parametrize("name", [n for n in list_models() if not model_info(n).tokens])
def test_forward_shape_on_one_channel_28px_data(name):
    model, x, info = build(name, "fashionmnist")
    assert x.shape[1] == 1 and x.shape[-1] == (model_info(name).image_size or 28)
    assert model.eval()(x).shape == (2, 10)


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "none"])
@pytest.mark.parametrize("width", [1, 2])
def test_resnet20_norms_and_widths(norm, width):
    model, x, _ = build("resnet20", norm=norm, width=width)
    assert model.eval()(x).shape == (2, 10)
    assert model.fc.in_features == 64 * width
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    if norm == "none":
        assert norms == []
    else:
        assert all(isinstance(m, nn.BatchNorm2d if norm == "batchnorm" else nn.GroupNorm) for m in norms)
        assert len(norms) == 1 + 2 * 9 + 2  # stem, two per block, two projection shortcuts


def test_fixup_initialisation():
    model, x, _ = build("resnet20", norm="none")
    blocks = [m for m in model.modules() if hasattr(m, "bias1a")]
    assert len(blocks) == 9
    for b in blocks:
        assert b.bias1a.shape == b.scale.shape == (1,)
        assert torch.count_nonzero(b.conv2.weight) == 0
    assert torch.count_nonzero(model.fc.weight) == 0
    # the first conv of each branch is scaled by L^(-1/2) = 1/3 relative to He init: std ~ sqrt(2/fan_in)/3
    w = blocks[4].conv1.weight
    assert abs(w.std().item() / ((2 / w[0].numel()) ** 0.5 / 3) - 1) < 0.1


@pytest.mark.parametrize("width,depth", [(32, 10), (8, 3), (16, 1)])
def test_mlp_depth_counts_linear_layers(width, depth):
    model = create_model("mlp", width=width, depth=depth)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == depth
    assert [m.out_features for m in linears] == [width] * (depth - 1) + [10]


def test_vgg_widths_and_norm():
    assert create_model("vgg11").classifier.in_features == 512
    plain = create_model("vgg16", width=0.5, norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) == 13
    assert plain.classifier.in_features == 256


@pytest.mark.parametrize("name", list_models())
def test_every_model_traces(name):
    """Every hidden Linear/Conv of the zoo has its output units in a permutation group (axis 0 of its weight
    is a member); only the layer whose output is the network's output (found with forward hooks) is not."""
    from onebasin.spec import trace

    model, x, _ = build(name)
    model.eval()
    outputs, hooks = {}, []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: outputs.setdefault(n, o.detach())))
    with torch.no_grad():
        y = model(x)
    for h in hooks:
        h.remove()
    heads = {n for n, o in outputs.items() if o.shape == y.shape and torch.equal(o, y)}
    assert len(heads) == 1, heads
    hidden = {f"{n}.weight" for n in outputs} - {f"{n}.weight" for n in heads}
    members = {m.key for g in trace(model, x).groups.values() for m in g.members if m.axis == 0}
    assert hidden <= members, sorted(hidden - members)


def test_mlp_spec_has_one_group_per_hidden_layer():
    from onebasin.spec import trace

    model, x, _ = build("mlp", width=24, depth=5)
    spec = trace(model, x)
    assert sorted(g.size for g in spec.groups.values()) == [24] * 4


@pytest.mark.parametrize("name,kwargs", [(n, {}) for n in list_models()]
                         + [("resnet20", {"norm": "layernorm"}), ("resnet20", {"norm": "none"}),
                            ("vgg11", {"norm": "none"})])
def test_random_permutation_preserves_function(name, kwargs):
    from onebasin.permute import permute_model, random_perms
    from onebasin.spec import trace

    model, x, _ = build(name, **kwargs)
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x  # token ids stay integers
    for m in model.modules():  # non-trivial norm statistics, so that permuting them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    for p in model.parameters():  # Fixup zero inits would hide a wrong permutation
        if torch.count_nonzero(p) == 0:
            p.data.normal_(0, 0.1)
    spec = trace(model, x)
    permuted = permute_model(model, spec, random_perms(spec, seed=1))
    with torch.no_grad():
        torch.testing.assert_close(permuted.eval()(x), model(x), rtol=1e-9, atol=1e-9)


def test_registry_entries_carry_their_recipe_and_demo_preset():
    """The recipe and demo preset come from the registry entry, not from the model's name."""
    from onebasin.experiment import demo_preset
    from onebasin.models._registry import _REGISTRY
    from onebasin.train import RECIPES, default_recipe

    @register_model(recipe="vgg", demo={"dataset": "mnist", "model_kwargs": {}, "calib_examples": 8, "train_eval_examples": 8})
    def toy_net(num_classes=10, in_channels=3):
        return nn.Conv2d(in_channels, num_classes, 1)

    @register_model
    def vgg_lookalike(num_classes=10, in_channels=3):
        return nn.Conv2d(in_channels, num_classes, 1)

    try:
        assert default_recipe("toy_net") == "vgg" and default_recipe("vgg_lookalike") == "resnet20"  # was: startswith("vgg")
        assert demo_preset("toy_net") == {"dataset": "mnist", "model_kwargs": {}, "calib_examples": 8, "train_eval_examples": 8,
                                          "epochs": RECIPES["vgg"].epochs}
        assert demo_preset("vgg_lookalike") is None and demo_preset("mlp") is None
        assert demo_preset("vit")["dataset"] == "fashionmnist" and demo_preset("gpt")["epochs"] == RECIPES["gpt"].epochs
    finally:
        _REGISTRY.pop("toy_net"), _REGISTRY.pop("vgg_lookalike")
