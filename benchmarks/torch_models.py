"""Plain PyTorch twins of ferlib's three networks, for the framework comparison only.

Each has the same layers, shapes and parameter count as the ferlib network it mirrors,
without ferlib's stem (rescaling, augmentation, gray to RGB): it takes float32 RGB
``(N, 3, 48, 48)``, like the "bare" Keras model of ``bench_train.without_stem``.

- :func:`alexnet`: ferlib's AlexNet-style CNN (5 conv + BN, 2 fully connected + BN, dropout).
- :func:`resnet50v2`: ``keras.applications.ResNet50V2`` (pre-activation bottlenecks, stride
  in the last block of a stage, 1x1 max-pool shortcuts), GAP, dropout, logits.
- :func:`vit`: ``keras_hub.models.ViTBackbone`` (conv patch embedding, class token, learned
  positions, pre-norm encoder blocks with GELU MLPs, final LayerNorm) with a class-token head.

PyTorch is not a dependency of the project: this module is imported by
``bench_frameworks.py`` only when ``torch`` is installed.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True)]


def alexnet(num_classes: int = 7, width: float = 0.75, dense_units: int = 1024,
            dropout_rate: float = 0.5) -> nn.Module:
    f = [max(8, int(round(c * width))) for c in (64, 128, 192, 192, 128)]
    # Keras pads "same" asymmetrically for the stride-2 5x5 conv (1 before, 2 after);
    # padding 2 on both sides gives the same 24x24 output and the same work.
    layers = [*_conv_bn_relu(3, f[0], 5, 2), *_conv_bn_relu(f[0], f[1], 3), nn.MaxPool2d(2),
              *_conv_bn_relu(f[1], f[2], 3), *_conv_bn_relu(f[2], f[3], 3),
              *_conv_bn_relu(f[3], f[4], 3), nn.MaxPool2d(2), nn.Flatten()]
    units = f[4] * 6 * 6
    for _ in range(2):
        layers += [nn.Linear(units, dense_units, bias=False),
                   nn.BatchNorm1d(dense_units, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True),
                   nn.Dropout(dropout_rate)]
        units = dense_units
    layers.append(nn.Linear(units, num_classes))
    return nn.Sequential(*layers)


class PreActBottleneck(nn.Module):
    """``keras.applications.resnet_v2``'s ``block2``."""

    def __init__(self, cin: int, filters: int, stride: int = 1, conv_shortcut: bool = False):
        super().__init__()
        self.preact = nn.Sequential(nn.BatchNorm2d(cin, eps=1.001e-5), nn.ReLU(inplace=True))
        if conv_shortcut:
            self.shortcut = nn.Conv2d(cin, 4 * filters, 1, stride)
        elif stride > 1:
            self.shortcut = nn.MaxPool2d(1, stride)
        else:
            self.shortcut = nn.Identity()
        self.conv_shortcut = conv_shortcut
        self.body = nn.Sequential(
            nn.Conv2d(cin, filters, 1, bias=False), nn.BatchNorm2d(filters, eps=1.001e-5),
            nn.ReLU(inplace=True),
            nn.Conv2d(filters, filters, 3, stride, padding=1, bias=False),
            nn.BatchNorm2d(filters, eps=1.001e-5), nn.ReLU(inplace=True),
            nn.Conv2d(filters, 4 * filters, 1))

    def forward(self, x):
        preact = self.preact(x)
        shortcut = self.shortcut(preact if self.conv_shortcut else x)
        return shortcut + self.body(preact)


class ResNet50V2(nn.Module):
    def __init__(self, num_classes: int = 7, dropout_rate: float = 0.3):
        super().__init__()
        stages, cin = [], 64
        for filters, blocks, stride in ((64, 3, 2), (128, 4, 2), (256, 6, 2), (512, 3, 1)):
            stage = [PreActBottleneck(cin, filters, conv_shortcut=True)]
            stage += [PreActBottleneck(4 * filters, filters) for _ in range(blocks - 2)]
            stage.append(PreActBottleneck(4 * filters, filters, stride=stride))
            stages += stage
            cin = 4 * filters
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, padding=3), nn.MaxPool2d(3, 2, padding=1), *stages,
            nn.BatchNorm2d(cin, eps=1.001e-5), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout_rate),
                                  nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def resnet50v2(num_classes: int = 7, dropout_rate: float = 0.3, **_) -> nn.Module:
    return ResNet50V2(num_classes, dropout_rate)


class ViT(nn.Module):
    def __init__(self, num_classes: int = 7, input_size: int = 48, patch_size: int = 6,
                 num_layers: int = 4, num_heads: int = 4, hidden_dim: int = 128,
                 mlp_dim: int = 256, dropout_rate: float = 0.1):
        super().__init__()
        tokens = (input_size // patch_size) ** 2 + 1
        self.patches = nn.Conv2d(3, hidden_dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.positions = nn.Parameter(torch.randn(1, tokens, hidden_dim) * 0.02)
        self.dropout = nn.Dropout(dropout_rate)
        layer = nn.TransformerEncoderLayer(hidden_dim, num_heads, mlp_dim, dropout_rate,
                                           activation="gelu", layer_norm_eps=1e-6,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.head = nn.Sequential(nn.Dropout(dropout_rate), nn.Linear(hidden_dim, num_classes))

    def forward(self, x):
        x = self.patches(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1)
        x = self.norm(self.encoder(self.dropout(x + self.positions)))
        return self.head(x[:, 0])


def vit(num_classes: int = 7, **params) -> nn.Module:
    keep = ("input_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim",
            "dropout_rate")
    return ViT(num_classes, **{k: v for k, v in params.items() if k in keep})


REGISTRY = {"alexnet": alexnet, "resnet50v2": resnet50v2, "vit": vit}


def build(name: str, model_params: dict) -> nn.Module:
    """The PyTorch twin of ferlib's ``name`` with the profile's ``model_params``."""
    params = {k: v for k, v in model_params.items()
              if k not in ("weights", "inference_blur_sigma", "input_size", "bn_momentum",
                           "attention_dropout")}
    if name == "vit":
        params["input_size"] = model_params.get("input_size", 48)
    return REGISTRY[name](**params)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
