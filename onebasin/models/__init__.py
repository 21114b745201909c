"""Model zoo of the REPAIR paper (Jordan et al. 2022), as a timm-style registry.

    model = create_model("resnet20", width=4, norm="layernorm", in_channels=1)
    list_models("vgg*")          # ['vgg11', 'vgg13', 'vgg16', 'vgg19']
    model_info("vgg11").image_size   # 32: VGG's five max-pools need 32x32 inputs

Each registered function's name is its key; its keyword arguments are the model's options. Every
model takes `num_classes`, and `in_features` (MLP) or `in_channels` (conv nets), so that it fits any
dataset; `input_kwargs(name, channels, image_size, num_classes)` builds those for a dataset. Models of
token ids (`gpt`, registered with tokens=True) take `vocab_size` and `block_size` instead;
`data_kwargs(name, dataset_info(...))` builds the right ones for either kind.
"""

from ._registry import ModelInfo, build_model, create_model, data_kwargs, input_kwargs, list_models, model_info, register_model
from . import gpt, mlp, resnet, vgg, vit  # noqa: F401  (registers the models)

__all__ = ["ModelInfo", "build_model", "create_model", "data_kwargs", "input_kwargs", "list_models", "model_info",
           "register_model"]
