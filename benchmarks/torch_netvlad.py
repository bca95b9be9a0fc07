"""NetVLAD for the parity tests and the benchmark (never imported by the library): a random release file in hloc's
MATLAB struct format, and a PyTorch NetVLAD loaded from it the way VPR-methods-evaluation / hloc load
``Pitts30K_struct.mat``.

Written from hloc ``hloc/extractors/netvlad.py`` and VPR-methods-evaluation ``vpr_models/netvlad.py``, not copied:

- :func:`write_netvlad_struct` writes ``{"net": {"layers": cell of 35 structs {name, type, weights}, "meta":
  {"normalization": {"averageImage": H x W x 3}}}}`` with ``scipy.io.savemat``: VGG-16's 13 convolutions at the
  MatConvNet layer indices (= torchvision's ``features`` indices) as ``(S, S, IN, OUT)`` kernels and ``OUT`` biases,
  the VLAD core at 30 (assignment ``D x K`` and the centres NEGATED), the PCA whitening at 33 (``1 x 1 x IN x OUT``
  and ``OUT``), weightless layers with an empty cell;
- :class:`TorchNetVLAD` reads it back with ``loadmat(struct_as_record=False, squeeze_me=True)`` and indexes it as
  hloc does (``layers[i].weights[0/1]``, ``-layers[30].weights[1]``, ``averageImage[0, 0]``), then runs the
  harness's forward: denormalize (clamped), 0-255, minus the mean pixel, VGG-16 ``features[:-2]``, channel L2,
  ``NetVLADLayer`` (1x1 ``Conv1d`` scores without bias, softmax over clusters, residuals, intra-normalization,
  ``view(b, -1)``, L2), whitening and L2.

The attention path enters as per-location weights ``[B, N]`` that multiply the assignment inside the residual sum
(``forward(images, location_weights)``); the tests compute them with a NumPy transcription of the formula.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.io import loadmat, savemat
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # up to conv5_3
TAIL = (("preL2", "custom"), ("vlad:core", "custom"), ("vlad:intranorm", "custom"), ("vlad:L2", "custom"),
        ("WPCA", "conv"), ("postL2", "custom"))  # fmt: skip


def _cell(*arrays: np.ndarray) -> np.ndarray:
    cell = np.empty((len(arrays),), dtype=object)
    for i, a in enumerate(arrays):
        cell[i] = a
    return cell


def random_netvlad_weights(rng: np.random.Generator, num_clusters: int = 64, whiten_dim: int | None = 4096) -> dict:
    """Seeded random weights in the file's layouts: ``convs`` [(kernel (3, 3, IN, OUT), bias (OUT,))], ``assign``
    and ``centers`` (the true centres, D x K), ``whiten`` (IN, OUT) and ``whiten_bias``, ``average_image``."""
    convs, in_ch = [], 3
    for c in VGG16:
        if c == "M":
            continue
        kernel = rng.normal(0.0, np.sqrt(2.0 / (9 * in_ch)), (3, 3, in_ch, c)).astype(np.float32)
        convs.append((kernel, (0.05 * rng.normal(size=c)).astype(np.float32)))
        in_ch = c
    d = 512
    weights = {
        "convs": convs,
        "assign": rng.normal(0.0, 3.0, (d, num_clusters)).astype(np.float32),
        "centers": (rng.normal(size=(d, num_clusters)) / np.sqrt(d)).astype(np.float32),
        # a constant image, as the mean-pixel normalization of a MatConvNet VGG is
        "average_image": np.broadcast_to(np.array([122.7, 114.9, 101.6], np.float32), (6, 5, 3)).copy(),
    }
    if whiten_dim is not None:
        weights["whiten"] = (rng.normal(size=(d * num_clusters, whiten_dim)) / np.sqrt(d * num_clusters)).astype(
            np.float32
        )
        weights["whiten_bias"] = (0.01 * rng.normal(size=whiten_dim)).astype(np.float32)
    return weights


def netvlad_layers(weights: dict) -> list[dict]:
    """The 35 layer structs (name, type, weights cell) of the file."""
    layers, convs, block, index = [], iter(weights["convs"]), 1, 1
    for c in VGG16:
        if c == "M":
            layers.append({"name": f"pool{block}", "type": "pool", "weights": _cell()})
            block, index = block + 1, 1
            continue
        layers.append({"name": f"conv{block}_{index}", "type": "conv", "weights": _cell(*next(convs))})
        if not (block == 5 and index == 3):  # the network ends at conv5_3, before its ReLU
            layers.append({"name": f"relu{block}_{index}", "type": "relu", "weights": _cell()})
        index += 1
    assert len(layers) == 29, len(layers)
    tail = [
        _cell(weights["assign"], -weights["centers"]),
        _cell(),
        _cell(),
        _cell(weights["whiten"][None, None], weights["whiten_bias"]) if "whiten" in weights else _cell(),
        _cell(),
    ]
    layers += [{"name": n, "type": t, "weights": w} for (n, t), w in zip(TAIL, [_cell(), *tail], strict=True)]
    return layers


def write_netvlad_struct(path, weights: dict) -> None:
    """Writes ``weights`` as hloc's ``*_struct.mat``."""
    layers = np.empty((len(netvlad_layers(weights)),), dtype=object)
    for i, layer in enumerate(netvlad_layers(weights)):
        layers[i] = layer
    net = {"layers": layers, "meta": {"normalization": {"averageImage": weights["average_image"]}}}
    savemat(str(path), {"net": net}, do_compression=False)


class TorchNetVLADLayer(nn.Module):
    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        self.score_proj = nn.Conv1d(dim, num_clusters, kernel_size=1, bias=False)
        self.centers = nn.Parameter(torch.empty(dim, num_clusters))

    def forward(self, x: torch.Tensor, location_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, D, N]`` (channel-normalized) -> ``[B, D * K]``."""
        scores = F.softmax(self.score_proj(x), dim=1)  # [B, K, N]
        if location_weights is not None:
            scores = scores * location_weights[:, None, :]
        residuals = x.unsqueeze(2) - self.centers.unsqueeze(0).unsqueeze(-1)  # [B, D, K, N]
        desc = (scores.unsqueeze(1) * residuals).sum(dim=-1)  # [B, D, K]
        desc = F.normalize(desc, dim=1)
        return F.normalize(desc.view(x.shape[0], -1), dim=1)


class TorchNetVLAD(nn.Module):
    """The harness's NetVLAD, its weights read from a ``*_struct.mat`` file as hloc reads them."""

    def __init__(self, path, whiten: bool = True):
        super().__init__()
        from torchvision.models import vgg16

        self.backbone = nn.Sequential(*list(vgg16().features.children())[:-2])
        mat = loadmat(str(path), struct_as_record=False, squeeze_me=True)
        layers = mat["net"].layers
        with torch.no_grad():
            for module, mat_layer in zip(self.backbone.children(), layers[:29], strict=True):
                if isinstance(module, nn.Conv2d):
                    module.weight.copy_(torch.tensor(mat_layer.weights[0]).float().permute(3, 2, 0, 1))
                    module.bias.copy_(torch.tensor(mat_layer.weights[1]).float())
            assign, centers = layers[30].weights[0], -layers[30].weights[1]
            self.netvlad = TorchNetVLADLayer(assign.shape[0], assign.shape[1])
            self.netvlad.score_proj.weight.copy_(torch.tensor(assign).float().permute(1, 0).unsqueeze(-1))
            self.netvlad.centers.copy_(torch.tensor(centers).float())
            self.whiten = None
            if whiten:
                w, b = layers[33].weights
                self.whiten = nn.Linear(w.shape[-2], w.shape[-1])
                self.whiten.weight.copy_(torch.tensor(w).float().squeeze().permute(1, 0))
                self.whiten.bias.copy_(torch.tensor(b.squeeze()).float())
        self.mean_pixel = torch.tensor(mat["net"].meta.normalization.averageImage[0, 0]).float()
        self.eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized ``[B, 3, H, W]`` -> the conv5_3 map ``[B, 512, h, w]``."""
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        rgb = torch.clamp(images * std + mean, 0.0, 1.0)
        pixels = torch.clamp(rgb * 255, 0.0, 255.0) - self.mean_pixel.view(1, 3, 1, 1)
        return self.backbone(pixels)

    def forward(self, images: torch.Tensor, location_weights: torch.Tensor | None = None) -> torch.Tensor:
        x = self.features(images)
        x = F.normalize(x.view(x.shape[0], x.shape[1], -1), dim=1)
        desc = self.netvlad(x, location_weights)
        return desc if self.whiten is None else F.normalize(self.whiten(desc), dim=1)
