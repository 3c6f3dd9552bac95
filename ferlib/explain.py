"""Saliency maps: where a trained model looks on a 48x48 face, for every registered model.

Two methods, both returning one map per image in [0, 1] at 48x48:

- **Grad-CAM** (Selvaraju et al. 2017): the gradient of the class logit weights the channels of
  a late feature map. The CNNs use their last convolutional block (AlexNet-style ``conv5_relu``,
  ResNet50V2 ``post_relu`` inside its ``keras.applications`` backbone). For the ViT it runs on
  the patch-token grid: keras-hub 0.32's ``ViTBackbone`` runs all transformer blocks inside one
  ``ViTEncoder`` layer that calls its attention without ``return_attention_scores``, so no
  attention scores are exposed and attention rollout is not available. The tokens used are
  those *entering* the last block: the backbone's output tokens would give zero gradients,
  because the head reads the class token only, and patch tokens reach it through the last
  block's attention. At 48 px ResNet50V2's last block is a 2x2 grid (1x1 at 32 px): pass
  ``layer="resnet50v2/conv4_block5_out"`` (3x3) or ``"resnet50v2/conv3_block3_out"`` (6x6)
  for finer, less abstract maps.
- **Occlusion sensitivity** (Zeiler and Fergus 2014): the drop in the class probability when a
  gray patch hides part of the face, from batched forward passes only, so it needs no
  gradients, works on any Keras backend and cross-checks the gradient method.

Gradients support the TensorFlow and JAX backends. Fixed face regions of the aligned FER
crop (:data:`FACE_REGIONS`) turn maps into shares of mass (eyes and brows, mouth, elsewhere)
and a short sentence per model. :func:`randomization_check` is the model-randomisation sanity
check of Adebayo et al. (2018): a saliency method worth showing must give different maps for
the trained model and for the same architecture with fresh weights.
"""

from __future__ import annotations

import dataclasses
import random
import weakref

import numpy as np
import pandas as pd

from ferlib import EMOTIONS, IMAGE_SIZE, NUM_CLASSES
from ferlib.inference import model_input, model_output

METHODS = ("auto", "grad_cam", "occlusion")
"""``saliency`` methods; ``auto`` is Grad-CAM (on the token grid for the ViT)."""

FACE_REGIONS = {
    "eyes": (slice(10, 24), slice(4, 44)),
    "mouth": (slice(30, 44), slice(12, 36)),
}
"""Fixed regions of the 48x48 FER crop as (rows, columns) slices, end exclusive.

FER2013 faces are registered so that the eyes sit near row 18 and the mouth near row 36:
``eyes`` (rows 10-23, columns 4-43) covers both eyes and the brows; ``mouth`` (rows 30-43,
columns 12-35) covers the lips and the mouth corners; everything else (forehead, nose, cheeks,
chin, hair, background) is ``elsewhere``. As shares of the crop's area: eyes 24%, mouth 15%,
elsewhere 61%, the shares a uniform map would give.
"""

REGION_LABELS = {"eyes": "the eyes and brows", "mouth": "the mouth", "elsewhere": "elsewhere"}

_CONV_TYPES = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose")
_AFTER_CONV_TYPES = ("BatchNormalization", "ReLU", "Activation", "LeakyReLU", "ELU", "PReLU",
                     "LayerNormalization", "GroupNormalization")
_SPLITS = weakref.WeakKeyDictionary()   # model -> {layer: _Split}


# ----------------------------------------------------------------------------- inputs

def _as_images(images) -> np.ndarray:
    """uint8 ``(N, 48, 48, 1)`` from (N, 48, 48), (N, 48, 48, 1) or one image."""
    images = np.asarray(images)
    if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] == 1
                            and images.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE)):
        images = images[None]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ValueError(f"images: expected gray 48x48 faces shaped (N, 48, 48) or "
                         f"(N, 48, 48, 1); got shape {images.shape}")
    if images.dtype != np.uint8:
        if images.size and (images.min() < 0 or images.max() > 255):
            raise ValueError(f"images: expected uint8 pixel values in [0, 255] (the models "
                             f"rescale internally); got {images.dtype} values in "
                             f"[{images.min()}, {images.max()}]")
        images = np.round(images).astype(np.uint8)
    return images


def _class_indices(class_index, logits) -> np.ndarray:
    """One class per image: the predicted one when ``class_index`` is None."""
    num_images, num_classes = logits.shape
    if class_index is None:
        return np.asarray(logits).argmax(axis=1)
    classes = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (num_images,)).copy()
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"class_index: expected class indices in [0, {num_classes - 1}]; got "
                         f"{sorted(set(classes.tolist()))}")
    return classes


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its maximum (negative values already clipped); all-zero stays 0."""
    peak = maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0)
    scale = np.where(peak > 0, peak, 1.0)
    return (maps / scale[:, None, None]).astype(np.float32)


def _upsample(maps: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinear resize of (N, h, w) maps to (N, size, size), pixel centres aligned."""
    from PIL import Image

    if maps.shape[1:] == (size, size):
        return maps.astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(m.astype(np.float32), mode="F")
                                .resize((size, size), Image.BILINEAR)) for m in maps])


# ----------------------------------------------------------------------------- model surgery

@dataclasses.dataclass
class _Split:
    """A model cut at the Grad-CAM target: ``head(features(images)) == model(images)``."""

    features: object          # keras.Model: uint8 images -> activations
    head: object              # keras.Model: activations -> logits
    target: str               # where the cut is, for people
    grid: tuple[int, int]     # spatial size of the map before upsampling
    skip_tokens: int = 0      # leading tokens (the class token) left out of a token grid
    tokens: bool = False      # activations are (N, tokens, dim), not (N, h, w, channels)


def _keras():
    import keras

    return keras


def _vit_encoder(layer):
    """The ``ViTEncoder`` of a keras-hub ViTBackbone, or None for any other layer."""
    if not hasattr(layer, "get_layer"):
        return None
    try:
        encoder = layer.get_layer("vit_encoder")
    except ValueError:
        return None
    return encoder if hasattr(encoder, "encoder_layers") else None


def _call_node(model, layer):
    """The one node where ``model`` calls the nested ``layer`` (its outer input and output)."""
    nodes = list(layer._inbound_nodes)
    if len(nodes) > 1:
        # Called in several graphs: keep the nodes of this one. Keras 3 Functional models key
        # their graph's nodes as "<id of the operation>_ib-<index of the call>".
        in_graph = getattr(model, "_nodes", set())
        nodes = [node for index, node in enumerate(nodes)
                 if f"{id(layer)}_ib-{index}" in in_graph]
    if len(nodes) != 1:
        raise ValueError(f"layer {layer.name!r} is called {len(nodes)} times in model "
                         f"{model.name!r}; Grad-CAM needs a layer used exactly once (pass "
                         f"another layer=..., or use method='occlusion')")
    return nodes[0]


def default_layer(model) -> str:
    """The Grad-CAM target chosen automatically for ``model``.

    Parameters
    ----------
    model : keras.Model
        A Functional model mapping uint8 48x48 images to logits.

    Returns
    -------
    str
        For a ViT (a keras-hub ``ViTBackbone`` inside): ``"<backbone>/<last transformer
        block>"``, meaning the tokens entering that block. For a nested convolutional backbone
        with a 4-D output (ResNet50V2): ``"<backbone>/<its last layer>"``, e.g.
        ``"resnet50v2/post_relu"``. Otherwise the last top-level convolution with the
        normalisation and activation layers right after it, e.g. ``"conv5_relu"``.
    """
    for layer in reversed(model.layers):
        encoder = _vit_encoder(layer)
        if encoder is not None:
            return f"{layer.name}/{encoder.encoder_layers[-1].name}"
    keras = _keras()
    layers = model.layers
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        if isinstance(layer, keras.Model) and len(layer.outputs) == 1 \
                and len(layer.outputs[0].shape) == 4:
            return f"{layer.name}/{layer.layers[-1].name}"
        if type(layer).__name__ in _CONV_TYPES:
            target = layer
            for follower in layers[index + 1:]:
                if (type(follower).__name__ not in _AFTER_CONV_TYPES
                        or tuple(follower.output.shape) != tuple(target.output.shape)):
                    break
                target = follower
            return target.name
    raise ValueError(f"model {model.name!r}: no convolutional layer, nested convolutional "
                     f"backbone or ViT backbone found for Grad-CAM; pass layer=<name> or use "
                     f"method='occlusion'")


def _split(model, layer=None) -> _Split:
    """Cut ``model`` at ``layer`` (default: :func:`default_layer`), cached per model."""
    layer = layer or default_layer(model)
    cache = _SPLITS.setdefault(model, {})
    if layer not in cache:
        cache[layer] = _check_split(model, _build_split(model, layer))
    return cache[layer]


def _build_split(model, layer: str) -> _Split:
    keras = _keras()
    outer_name, _, inner_name = layer.partition("/")
    try:
        outer = model.get_layer(outer_name)
    except ValueError as error:
        names = ", ".join(item.name for item in model.layers)
        raise ValueError(f"layer={layer!r}: model {model.name!r} has no layer {outer_name!r}; "
                         f"top-level layers: {names}") from error
    if not inner_name:
        output = outer.output
        if len(output.shape) != 4:
            raise ValueError(f"layer={layer!r}: Grad-CAM needs a (batch, height, width, "
                             f"channels) output; {outer_name!r} outputs {tuple(output.shape)}")
        head = _head_from(output, model_output(model), layer, model.name)
        return _Split(keras.Model(model_input(model), output), head, target=layer,
                      grid=tuple(output.shape[1:3]))
    if not isinstance(outer, keras.Model):
        raise ValueError(f"layer={layer!r}: {outer_name!r} is not a nested model; use a "
                         f"top-level layer name or '<nested model>/<inner layer>'")
    node = _call_node(model, outer)
    outer_input, outer_output = node.input_tensors[0], node.output_tensors[0]
    outer_head = keras.Model(outer_output, model_output(model))
    encoder = _vit_encoder(outer)
    if encoder is not None:
        return _vit_split(model, outer, encoder, inner_name, outer_input, outer_head)
    try:
        inner = outer.get_layer(inner_name)
    except ValueError as error:
        raise ValueError(f"layer={layer!r}: the nested model {outer_name!r} has no layer "
                         f"{inner_name!r}") from error
    if len(inner.output.shape) != 4:
        raise ValueError(f"layer={layer!r}: Grad-CAM needs a (batch, height, width, channels) "
                         f"output; {inner_name!r} outputs {tuple(inner.output.shape)}")
    if inner.output is outer.outputs[0]:
        features = keras.Model(model_input(model), outer_output)
        return _Split(features, outer_head, target=layer, grid=tuple(outer_output.shape[1:3]))
    inner_features = keras.Model(model_input(outer), inner.output)
    inner_head = _head_from(inner.output, model_output(outer), layer, outer_name)
    features = keras.Model(model_input(model), inner_features(outer_input))
    activations = keras.Input(shape=tuple(inner.output.shape[1:]), dtype=inner.output.dtype)
    head = keras.Model(activations, outer_head(inner_head(activations)))
    return _Split(features, head, target=layer, grid=tuple(inner.output.shape[1:3]))


def _head_from(tensor, output, layer, model_name):
    """The part of a graph from ``tensor`` to ``output``; it must depend on ``tensor`` alone."""
    keras = _keras()
    try:
        return keras.Model(tensor, output)
    except ValueError as error:
        raise ValueError(f"layer={layer!r}: the rest of {model_name!r} does not depend on this "
                         f"layer's output alone (a skip connection bypasses it); pick a block "
                         f"output such as ResNet's 'conv4_block5_out' ({error})") from error


def _vit_split(model, backbone, encoder, block_name, outer_input, outer_head) -> _Split:
    """Cut a keras-hub ViT at the tokens entering transformer block ``block_name``.

    ``ViTEncoder.call`` is dropout, the blocks in order, then a layer norm; its sublayers are
    called here in that order (checked against the whole model in :func:`_check_split`).
    """
    keras = _keras()
    blocks = list(encoder.encoder_layers)
    names = [block.name for block in blocks]
    if block_name not in names:
        raise ValueError(f"layer={backbone.name}/{block_name}: no such transformer block; "
                         f"blocks: {', '.join(names)}")
    cut = names.index(block_name)
    embedding = backbone.get_layer("vit_patching_and_embedding")
    tokens = encoder.dropout(embedding(outer_input))
    for block in blocks[:cut]:
        tokens = block(tokens)
    features = keras.Model(model_input(model), tokens)
    entering = keras.Input(shape=tuple(tokens.shape[1:]), dtype=tokens.dtype)
    x = entering
    for block in blocks[cut:]:
        x = block(x)
    head = keras.Model(entering, outer_head(encoder.layer_norm(x)))
    grid = tuple(int(size) // int(patch) for size, patch in
                 zip(embedding.image_size, embedding.patch_size))
    return _Split(features, head, target=f"{backbone.name}/{block_name} (entering tokens)",
                  grid=grid, skip_tokens=1 if embedding.use_class_token else 0, tokens=True)


def _check_split(model, split: _Split) -> _Split:
    """The cut model must reproduce the model's logits (guards against library changes)."""
    keras = _keras()
    probe = np.full((2, IMAGE_SIZE, IMAGE_SIZE, 1), 128, np.uint8)
    probe[1, ::3] = 30
    whole = keras.ops.convert_to_numpy(model(probe, training=False))
    cut = keras.ops.convert_to_numpy(split.head(split.features(probe, training=False),
                                                training=False))
    if not np.allclose(whole, cut, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(whole).max())):
        raise RuntimeError(f"Grad-CAM at {split.target}: the model cut there does not "
                           f"reproduce {model.name!r}'s logits (max difference "
                           f"{np.abs(whole - cut).max():.3g}); the layer is not on the only "
                           f"path to the output, or the installed keras-hub changed its ViT")
    return split


# ----------------------------------------------------------------------------- gradients

def _logits_and_gradients(head, activations: np.ndarray, class_index):
    """Logits, the classes used and d logit[class] / d activations, on the active backend."""
    keras = _keras()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        inputs = tf.convert_to_tensor(activations)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            logits = head(inputs, training=False)
        classes = _class_indices(class_index, logits.numpy())
        selector = tf.one_hot(classes, logits.shape[-1], dtype=logits.dtype)
        gradients = tape.gradient(logits, inputs, output_gradients=selector)
        return logits.numpy(), classes, gradients.numpy()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [variable.value for variable in head.trainable_variables]
        non_trainable = [variable.value for variable in head.non_trainable_variables]

        def forward(inputs):
            logits, _ = head.stateless_call(trainable, non_trainable, inputs, training=False)
            return logits

        logits, pullback = jax.vjp(forward, jnp.asarray(activations))
        classes = _class_indices(class_index, np.asarray(logits))
        (gradients,) = pullback(jax.nn.one_hot(classes, logits.shape[-1], dtype=logits.dtype))
        return np.asarray(logits), classes, np.asarray(gradients)
    raise NotImplementedError(f"Grad-CAM: gradients are implemented for the tensorflow and jax "
                              f"Keras backends, not {backend!r}; use method='occlusion' (no "
                              f"gradients needed) or set KERAS_BACKEND to tensorflow or jax")


def grad_cam(model, images, class_index=None, layer=None, batch_size=64) -> np.ndarray:
    """Grad-CAM maps, upsampled to 48x48 and scaled to [0, 1] per image.

    Parameters
    ----------
    model : keras.Model
        A Functional model mapping uint8 48x48 gray images to logits (any registered model).
    images : array_like
        uint8 ``(N, 48, 48)`` or ``(N, 48, 48, 1)``.
    class_index : int or array_like of int, optional
        The class explained, one for all images or one per image; None: each image's
        predicted class.
    layer : str, optional
        Where to take the feature map: a top-level layer name (``"conv5_relu"``), or
        ``"<nested model>/<inner layer>"`` (``"resnet50v2/conv4_block6_out"``); for a ViT,
        ``"<backbone>/<transformer block>"`` takes the tokens entering that block. Default:
        :func:`default_layer`.
    batch_size : int
        Images per forward and backward pass.

    Returns
    -------
    numpy.ndarray, float32, shape (N, 48, 48)
        ReLU of the gradient-weighted channel sum; an all-zero map where no location
        increases the class logit.
    """
    images = _as_images(images)
    split = _split(model, layer)
    keras = _keras()
    if class_index is not None:
        class_index = _class_indices(class_index, np.zeros((len(images),
                                                            model.outputs[0].shape[-1])))
    maps = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        activations = keras.ops.convert_to_numpy(split.features(batch, training=False))
        classes = None if class_index is None else class_index[start:start + batch_size]
        _, _, gradients = _logits_and_gradients(split.head, activations, classes)
        activations = activations.astype(np.float32)
        gradients = gradients.astype(np.float32)
        if split.tokens:
            shape = (len(batch), *split.grid, activations.shape[-1])
            activations = activations[:, split.skip_tokens:].reshape(shape)
            gradients = gradients[:, split.skip_tokens:].reshape(shape)
        weights = gradients.mean(axis=(1, 2))
        cams = np.maximum(np.einsum("nhwc,nc->nhw", activations, weights), 0)
        maps.append(_upsample(cams))
    if not maps:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    return _normalise(np.concatenate(maps))


# ----------------------------------------------------------------------------- occlusion

def _starts(size: int, patch: int, stride: int) -> list[int]:
    """Patch offsets along one axis; the last patch always reaches the border."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def _probabilities(model, images, batch_size):
    """Softmax of the logits; every batch padded to ``batch_size`` (one trace per model)."""
    from ferlib.inference import predict_proba

    return predict_proba(model, images, batch_size=batch_size, pad_batches=True, isolated=True)


def occlusion(model, images, class_index=None, patch=8, stride=4, fill=128,
              batch_size=256) -> np.ndarray:
    """Occlusion sensitivity: the drop in the class probability when a gray patch hides a spot.

    Parameters
    ----------
    model : keras.Model
        Maps uint8 48x48 images to logits (any backend: forward passes only).
    images : array_like
        uint8 ``(N, 48, 48)`` or ``(N, 48, 48, 1)``.
    class_index : int or array_like of int, optional
        The class explained; None: each image's predicted class.
    patch, stride : int
        Side of the square patch and its step in pixels (8 and 4: 11 x 11 = 121 positions).
    fill : int
        Gray value of the patch.
    batch_size : int
        Images per forward pass.

    Returns
    -------
    numpy.ndarray, float32, shape (N, 48, 48)
        Per pixel, the mean drop over the patch positions covering it, negative drops (the
        class got likelier) clipped to 0, scaled to [0, 1] per image.
    """
    if not (1 <= patch <= IMAGE_SIZE and stride >= 1):
        raise ValueError(f"occlusion: expected 1 <= patch <= {IMAGE_SIZE} and stride >= 1; got "
                         f"patch={patch}, stride={stride}")
    if not 0 <= fill <= 255:
        raise ValueError(f"occlusion: fill must be a gray value in [0, 255]; got {fill}")
    images = _as_images(images)
    if not len(images):
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    base = _probabilities(model, images, batch_size)
    classes = _class_indices(class_index, base)
    positions = [(y, x) for y in _starts(IMAGE_SIZE, patch, stride)
                 for x in _starts(IMAGE_SIZE, patch, stride)]
    coverage = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    for y, x in positions:
        coverage[y:y + patch, x:x + patch] += 1
    total = np.zeros((len(images), IMAGE_SIZE, IMAGE_SIZE))
    # About 8k occluded copies per chunk: ~20 MB of uint8, many full batches.
    chunk = max(1, 8192 // len(positions))
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk]
        occluded = np.repeat(batch[:, None], len(positions), axis=1)
        for index, (y, x) in enumerate(positions):
            occluded[:, index, y:y + patch, x:x + patch] = fill
        proba = _probabilities(model, occluded.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1),
                               batch_size).reshape(len(batch), len(positions), -1)
        rows = np.arange(len(batch))
        target = classes[start:start + chunk]
        drops = base[start + rows, target][:, None] - proba[rows, :, target]   # (n, positions)
        for index, (y, x) in enumerate(positions):
            total[start:start + chunk, y:y + patch, x:x + patch] += drops[:, index, None, None]
    return _normalise(np.maximum(total / coverage, 0))


# ----------------------------------------------------------------------------- one entry point

def saliency(model, images, method="auto", class_index=None, **options) -> np.ndarray:
    """Saliency maps by name: ``"auto"`` or ``"grad_cam"`` (Grad-CAM), ``"occlusion"``.

    Parameters
    ----------
    model : keras.Model
    images : array_like
        uint8 ``(N, 48, 48)`` or ``(N, 48, 48, 1)``.
    method : str
        One of :data:`METHODS`.
    class_index : int or array_like of int, optional
        The class explained; None: the predicted class.
    **options
        Passed on: ``layer``, ``batch_size`` (Grad-CAM); ``patch``, ``stride``, ``fill``,
        ``batch_size`` (occlusion).

    Returns
    -------
    numpy.ndarray, float32, shape (N, 48, 48)
        Maps in [0, 1].
    """
    if method in ("auto", "grad_cam"):
        return grad_cam(model, images, class_index=class_index, **options)
    if method == "occlusion":
        return occlusion(model, images, class_index=class_index, **options)
    raise ValueError(f"method: unknown saliency method {method!r}; allowed values: "
                     f"{', '.join(METHODS)}")


def saliency_method(model, method="auto", layer=None, patch=8, stride=4) -> str:
    """A sentence naming the saliency method :func:`saliency` uses for ``model``, for reports.

    Parameters
    ----------
    model : keras.Model
    method : str
        One of :data:`METHODS`.
    layer : str, optional
        A Grad-CAM target other than the default.
    patch, stride : int
        The occlusion settings used.

    Returns
    -------
    str
        E.g. ``"Grad-CAM at conv5_relu (12x12 grid)"``, or for the ViT ``"Grad-CAM on the 8x8
        patch-token grid (...); no attention rollout: ..."``.
    """
    if method == "occlusion":
        return (f"occlusion sensitivity (drop in the class probability under a {patch}x{patch} "
                f"gray patch, stride {stride})")
    if method not in ("auto", "grad_cam"):
        raise ValueError(f"method: unknown saliency method {method!r}; allowed values: "
                         f"{', '.join(METHODS)}")
    split = _split(model, layer)
    rows, columns = split.grid
    if split.tokens:
        return (f"Grad-CAM on the {rows}x{columns} patch-token grid (tokens entering "
                f"{split.target.split('/')[-1].split(' ')[0]}); no attention rollout: the "
                f"keras-hub ViTBackbone does not expose attention scores")
    return f"Grad-CAM at {split.target} ({rows}x{columns} grid)"


# ----------------------------------------------------------------------------- regions

def _region_masks() -> dict[str, np.ndarray]:
    masks = {}
    for name, (rows, columns) in FACE_REGIONS.items():
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
        mask[rows, columns] = True
        masks[name] = mask
    masks["elsewhere"] = ~np.logical_or.reduce(list(masks.values()))
    return masks


def region_areas() -> dict[str, float]:
    """Share of the 48x48 crop covered by each region (what a uniform map would give)."""
    return {name: float(mask.mean()) for name, mask in _region_masks().items()}


def region_shares(maps) -> dict[str, float]:
    """Share of the saliency mass in each fixed face region, averaged over maps.

    Parameters
    ----------
    maps : array_like, shape (48, 48) or (N, 48, 48)
        Non-negative maps; maps with no mass (all zero or NaN) are left out.

    Returns
    -------
    dict
        ``eyes``, ``mouth``, ``elsewhere`` (summing to 1; NaN if no map has mass) and
        ``maps``, the number of maps averaged.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3 or maps.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"maps: expected shape (48, 48) or (N, 48, 48); got {maps.shape}")
    maps = np.nan_to_num(np.maximum(maps, 0) if maps.size else maps, nan=0.0)
    mass = maps.sum(axis=(1, 2))
    used = maps[mass > 0] / mass[mass > 0, None, None]
    shares = {name: float(used[:, mask].sum(axis=1).mean()) if len(used) else float("nan")
              for name, mask in _region_masks().items()}
    return {**shares, "maps": int(len(used))}


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def describe_regions(maps_by_class, class_names=EMOTIONS, lift=1.2) -> str:
    """A short, data-driven sentence on where one model's saliency mass concentrates.

    Parameters
    ----------
    maps_by_class : dict of str to array_like, or array_like of shape (C, 48, 48)
        Per class, its mean map (or a stack of maps), e.g. from :func:`mean_maps_by_class`.
    class_names : sequence of str
        Names for an array input, in class-index order.
    lift : float
        A class "looks at" a region when the region's share of the mass is at least ``lift``
        times its share of the area, and more so than for the other region.

    Returns
    -------
    str
        E.g. "Over all classes 34% of the saliency falls on the eyes and brows (24% of the
        crop), 22% on the mouth (15%) and 44% elsewhere. Relative to area, the mouth leads
        for happy (41%) and surprise (30%); the eyes and brows lead for angry (45%) and fear
        (39%); neither region stands out for disgust, sad and neutral." Percentages after
        class names are the leading region's share of that class's mass.
    """
    if not isinstance(maps_by_class, dict):
        maps_by_class = dict(zip(class_names, np.asarray(maps_by_class)))
    areas = region_areas()
    per_class = {name: region_shares(maps) for name, maps in maps_by_class.items()}
    per_class = {name: shares for name, shares in per_class.items() if shares["maps"]}
    if not per_class:
        return "No saliency mass to describe (every map is empty)."
    overall = {region: float(np.mean([shares[region] for shares in per_class.values()]))
               for region in areas}
    sentence = (f"Over all classes {overall['eyes']:.0%} of the saliency falls on the eyes and "
                f"brows ({areas['eyes']:.0%} of the crop), {overall['mouth']:.0%} on the mouth "
                f"({areas['mouth']:.0%}) and {overall['elsewhere']:.0%} elsewhere.")
    leaders = {"mouth": [], "eyes": [], "neither": []}
    for name, shares in per_class.items():
        ratios = {region: shares[region] / areas[region] for region in ("eyes", "mouth")}
        best = max(ratios, key=ratios.get)
        leaders[best if ratios[best] >= lift else "neither"].append(
            (name, shares[best]))
    parts = []
    for region in ("mouth", "eyes"):
        if leaders[region]:
            ordered = sorted(leaders[region], key=lambda item: -item[1])
            verb = "leads" if region == "mouth" else "lead"
            parts.append(f"{REGION_LABELS[region]} {verb} for "
                         f"{_join([f'{name} ({share:.0%})' for name, share in ordered])}")
    if leaders["neither"]:
        parts.append(f"neither region stands out for "
                     f"{_join([name for name, _ in leaders['neither']])}")
    text = "; ".join(parts)
    return f"{sentence} Relative to area, {text}."


# ----------------------------------------------------------------------------- per class

def mean_maps_by_class(model, images, labels, method="auto", per_class=50, seed=0,
                       target="label", **options) -> np.ndarray:
    """Mean saliency map per class over (up to) ``per_class`` images of that class.

    Parameters
    ----------
    model : keras.Model
    images : array_like
        uint8 ``(N, 48, 48)`` or ``(N, 48, 48, 1)``.
    labels : array_like of int, shape (N,)
        True classes.
    method : str
        One of :data:`METHODS`.
    per_class : int or None
        Images drawn per class (without replacement, seeded); None uses all.
    seed : int
        Seed of the draw.
    target : str
        ``"label"`` explains each image's true class, ``"predicted"`` the predicted one.
    **options
        Passed to :func:`saliency`.

    Returns
    -------
    numpy.ndarray, float32, shape (7, 48, 48)
        Mean of the per-image [0, 1] maps, so every face counts equally; NaN for a class
        with no images.
    """
    images = _as_images(images)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if len(labels) != len(images):
        raise ValueError(f"labels: {len(labels)} labels for {len(images)} images")
    if target not in ("label", "predicted"):
        raise ValueError(f"target: expected 'label' or 'predicted'; got {target!r}")
    rng = np.random.default_rng(seed)
    chosen = []
    for k in range(NUM_CLASSES):
        members = np.flatnonzero(labels == k)
        if per_class is not None and len(members) > per_class:
            members = np.sort(rng.choice(members, size=per_class, replace=False))
        chosen.append(members)
    order = np.concatenate(chosen).astype(np.int64)
    class_index = labels[order] if target == "label" else None
    maps = saliency(model, images[order], method=method, class_index=class_index, **options)
    means = np.full((NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE), np.nan, np.float32)
    start = 0
    for k, members in enumerate(chosen):
        if len(members):
            means[k] = maps[start:start + len(members)].mean(axis=0)
        start += len(members)
    return means


def select_faces(labels, proba, correct=4, wrong=4, class_names=EMOTIONS) -> pd.DataFrame:
    """Faces for a report's grid: per true class, the most confidently right and wrong ones.

    Parameters
    ----------
    labels : array_like of int, shape (N,)
    proba : array_like, shape (N, C)
    correct, wrong : int
        How many correctly and wrongly classified faces per class (fewer if there are not
        enough).
    class_names : sequence of str

    Returns
    -------
    pandas.DataFrame
        One row per face, class by class: ``index`` (into ``labels``), ``true``,
        ``predicted``, ``confidence`` (the predicted class's probability), ``correct``
        (bool) and ``title`` ("happy → sad 0.81").
    """
    labels = np.asarray(labels, dtype=np.int64).ravel()
    proba = np.asarray(proba, dtype=np.float64)
    predicted, confidence = proba.argmax(axis=1), proba.max(axis=1)
    rows = []
    for k in range(proba.shape[1]):
        for is_right, count in ((True, correct), (False, wrong)):
            members = np.flatnonzero((labels == k) & ((predicted == k) == is_right))
            for index in members[np.argsort(-confidence[members], kind="stable")][:count]:
                arrow = "" if is_right else f" → {class_names[predicted[index]]}"
                rows.append({"index": int(index), "true": class_names[k],
                             "predicted": class_names[predicted[index]],
                             "confidence": float(confidence[index]), "correct": is_right,
                             "title": f"{class_names[k]}{arrow} {confidence[index]:.2f}"})
    return pd.DataFrame(rows, columns=["index", "true", "predicted", "confidence", "correct",
                                       "title"])


# ----------------------------------------------------------------------------- sanity check

def reinitialised(model, seed=0):
    """The same architecture as ``model`` with fresh, seeded initial weights.

    Keras draws each initializer's seed from Python's ``random`` when the layer is created;
    the state of ``random`` is saved and restored, so nothing global changes.

    Parameters
    ----------
    model : keras.Model
    seed : int

    Returns
    -------
    keras.Model
    """
    keras = _keras()
    import ferlib.models  # noqa: F401  (registers the custom layers for cloning)

    state = random.getstate()
    try:
        random.seed(seed)
        return keras.models.clone_model(model)
    finally:
        random.setstate(state)


def _rank_rows(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values, axis=1)


def randomization_check(model, images, method="auto", reinitialised_model=None, class_index=None,
                        seed=0, threshold=0.5, **options) -> dict:
    """Model-randomisation sanity check (Adebayo et al. 2018) of a saliency method.

    Maps of the trained model are compared with maps of the same architecture with
    re-initialised weights, for the same images and the same class (the trained model's
    prediction unless ``class_index`` is given). A method that reflects what the model learned
    gives dissimilar maps; one that mostly shows the input's edges gives similar maps.

    Parameters
    ----------
    model : keras.Model
        The trained model.
    images : array_like
        uint8 ``(N, 48, 48)`` or ``(N, 48, 48, 1)``.
    method : str
        One of :data:`METHODS`.
    reinitialised_model : keras.Model, optional
        The same architecture with other weights; default :func:`reinitialised` ``(model,
        seed)``.
    class_index : int or array_like of int, optional
    seed : int
        Seed of the re-initialisation.
    threshold : float
        The check passes when the mean rank correlation is below this.
    **options
        Passed to :func:`saliency`.

    Returns
    -------
    dict
        ``spearman`` (mean Spearman rank correlation over the images where both maps vary),
        ``spearman_per_image`` (NaN where a map is constant, e.g. a 1x1 Grad-CAM grid),
        ``constant_maps``, ``images``, ``method``, ``threshold`` and ``passes``: True when
        ``spearman`` is defined and below ``threshold``.
    """
    images = _as_images(images)
    if class_index is None:
        class_index = _probabilities(model, images, 256).argmax(axis=1)
    trained_maps = saliency(model, images, method=method, class_index=class_index, **options)
    if reinitialised_model is None:
        reinitialised_model = reinitialised(model, seed)
    random_maps = saliency(reinitialised_model, images, method=method, class_index=class_index,
                           **options)
    first = _rank_rows(trained_maps.reshape(len(images), -1))
    second = _rank_rows(random_maps.reshape(len(images), -1))
    first -= first.mean(axis=1, keepdims=True)
    second -= second.mean(axis=1, keepdims=True)
    scale = np.sqrt((first ** 2).sum(axis=1) * (second ** 2).sum(axis=1))
    constant = scale == 0
    correlation = np.where(constant, np.nan,
                           (first * second).sum(axis=1) / np.where(constant, 1, scale))
    defined = correlation[~constant]
    mean = float(defined.mean()) if len(defined) else float("nan")
    return {"spearman": mean, "spearman_per_image": correlation.tolist(),
            "constant_maps": int(constant.sum()), "images": int(len(images)),
            "method": method, "threshold": float(threshold),
            "passes": bool(np.isfinite(mean) and mean < threshold)}
