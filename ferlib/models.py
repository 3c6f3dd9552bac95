"""Model registry: ``build_model(name, ...)`` returns a Functional, backend-agnostic Keras 3 model.

Every model takes uint8 gray images ``(batch, 48, 48)`` or ``(batch, 48, 48, 1)`` and outputs
logits. Its first layers rescale to [0, 1], augment (active only in training), resize to the
model's input size, turn gray into 3 channels and rescale to the backbone's expected range, so a
saved ``.keras`` file is all that is needed to classify raw FER crops.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import keras
import numpy as np
from keras import layers

from ferlib import IMAGE_SIZE, MODEL_NAMES, NUM_CLASSES

RESNET_IMAGENET_FILE = "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
VIT_IMAGENET_PRESET = "vit_base_patch16_224_imagenet"


@keras.saving.register_keras_serializable(package="ferlib")
class ClassToken(layers.Layer):
    """Select the class token (position 0) of a ``(batch, tokens, dim)`` sequence."""

    def call(self, inputs):
        return inputs[:, 0, :]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


@keras.saving.register_keras_serializable(package="ferlib")
class PatchTokenMean(layers.Layer):
    """Mean of the patch tokens (positions 1..) of a ``(batch, tokens, dim)`` sequence."""

    def call(self, inputs):
        return keras.ops.mean(inputs[:, 1:, :], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


@keras.saving.register_keras_serializable(package="ferlib")
class GrayToRGB(layers.Layer):
    """Repeat a single gray channel three times (backbones expect RGB)."""

    def call(self, inputs):
        return keras.ops.repeat(inputs, 3, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)


def derived_seed(seed: int | None, *stream) -> int | None:
    """An independent 31-bit seed for one random stream (a layer, an epoch) of a base seed.

    Layers given the same seed draw identical numbers: flips would always come with the same
    rotation. ``SeedSequence`` mixes the stream's identity into the seed instead.
    """
    if seed is None:
        return None
    words = [seed, *(zlib.crc32(part.encode()) if isinstance(part, str) else int(part)
                     for part in stream)]
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


def augmentation_layers(augment: dict | None, seed: int | None = None) -> list[layers.Layer]:
    """Keras core augmentation layers (active only when ``training=True``) on [0, 1] images.

    Each layer draws from its own seed derived from ``seed``. MixUp and CutMix need the
    labels, so they are applied to batches in ``ferlib.train``.
    """
    augment = augment or {}
    stack = []
    if augment.get("flip"):
        stack.append(layers.RandomFlip("horizontal", seed=derived_seed(seed, "flip")))
    if augment.get("rotation"):
        stack.append(layers.RandomRotation(augment["rotation"], fill_mode="reflect",
                                           seed=derived_seed(seed, "rotation")))
    if augment.get("translation"):
        stack.append(layers.RandomTranslation(augment["translation"], augment["translation"],
                                              fill_mode="reflect",
                                              seed=derived_seed(seed, "translation")))
    if augment.get("zoom"):
        stack.append(layers.RandomZoom(augment["zoom"], fill_mode="reflect",
                                       seed=derived_seed(seed, "zoom")))
    if augment.get("rand_augment"):
        stack.append(layers.RandAugment(value_range=(0, 1),
                                        seed=derived_seed(seed, "rand_augment")))
    if augment.get("erasing"):
        stack.append(layers.RandomErasing(factor=augment["erasing"], value_range=(0, 1),
                                          seed=derived_seed(seed, "erasing")))
    if keras.backend.backend() == "jax":
        # Keras marks these layers unfit for XLA (TensorFlow's image-transform op has no XLA
        # kernel), and one such layer makes Keras run the whole train step uncompiled, op by
        # op. Their JAX ops compile, and the seed state still advances every step (tested).
        for layer in stack:
            if isinstance(layer, (layers.RandomRotation, layers.RandomTranslation,
                                  layers.RandomZoom)):
                layer.supports_jit = True
    return stack


@keras.saving.register_keras_serializable(package="ferlib")
class Augmentation(layers.Layer):
    """The augmentation layers, applied only when called with ``training=True`` (``fit``).

    Keras' random layers default to ``training=True`` and, called with ``training=None``,
    switch the whole call to training mode: ``model(x)`` would then run BatchNormalization on
    batch statistics. Inside this layer they run only when training is asked for, so
    ``model(x)``, ``predict`` and exported graphs are plain inference.
    """

    def __init__(self, augment: dict | None = None, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.augment, self.seed = dict(augment or {}), seed
        self.stack = augmentation_layers(self.augment, seed)

    def build(self, input_shape):
        for layer in self.stack:
            layer.build(input_shape)

    def call(self, inputs, training=None):
        if not training:
            return inputs
        for layer in self.stack:
            inputs = layer(inputs, training=True)
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "augment": self.augment, "seed": self.seed}


def stem(inputs, input_size: int, augment: dict | None, scale_to: str, seed=None):
    """uint8 gray -> augmented, resized, 3-channel float in the backbone's range.

    ``scale_to`` is ``"unit"`` for [0, 1] or ``"symmetric"`` for [-1, 1].
    """
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    if augmentation_layers(augment):
        x = Augmentation(augment, seed, name="augmentation")(x)
    if input_size != IMAGE_SIZE:
        # training=False: a preprocessing layer's default (True) would switch BatchNormalization
        # to batch statistics in ``model(x)``; resizing is the same in training anyway.
        x = layers.Resizing(input_size, input_size, name="resize")(x, training=False)
    x = GrayToRGB(name="gray_to_rgb")(x)
    if scale_to == "symmetric":
        x = layers.Rescaling(2.0, offset=-1.0, name="to_symmetric")(x)
    return x


def _inputs():
    return keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype="uint8", name="image")


def _logits(x, num_classes: int):
    # Logits in float32 even under a mixed-precision policy: the loss needs the range.
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


def _check_local_weights(weights: str | None) -> None:
    if weights not in (None, "imagenet") and not Path(weights).exists():
        raise FileNotFoundError(f"weights: no file {weights}; pass None, 'imagenet' or the path "
                                f"of a local weights file")


def build_alexnet(num_classes=NUM_CLASSES, *, input_size=IMAGE_SIZE, width=1.0,
                  dense_units=1024, dropout_rate=0.5, weights=None, augment=None, seed=None):
    """AlexNet-style CNN for 48x48 faces: 5 conv layers, 3 fully connected with dropout.

    Like the original's stride-4 first layer, it downsamples early (stride-2 conv, then
    pooling), so it trains several times faster than a full-resolution design.
    """
    _check_local_weights(weights)
    filters = [max(8, int(round(f * width))) for f in (64, 128, 192, 192, 128)]
    inputs = _inputs()
    x = stem(inputs, input_size, augment, "unit", seed)

    def conv(x, n, kernel, strides=1, name=""):
        x = layers.Conv2D(n, kernel, strides=strides, padding="same", use_bias=False,
                          name=name)(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    x = conv(x, filters[0], 5, strides=2, name="conv1")            # 48 -> 24
    x = conv(x, filters[1], 3, name="conv2")
    x = layers.MaxPooling2D(2, name="pool2")(x)                     # 24 -> 12
    x = conv(x, filters[2], 3, name="conv3")
    x = conv(x, filters[3], 3, name="conv4")
    x = conv(x, filters[4], 3, name="conv5")
    x = layers.MaxPooling2D(2, name="pool5")(x)                     # 12 -> 6
    x = layers.Flatten(name="flatten")(x)
    for index in (1, 2):
        x = layers.Dense(dense_units, use_bias=False, name=f"fc{index}")(x)
        x = layers.BatchNormalization(name=f"fc{index}_bn")(x)
        x = layers.ReLU(name=f"fc{index}_relu")(x)
        x = layers.Dropout(dropout_rate, name=f"fc{index}_dropout")(x)
    model = keras.Model(inputs, _logits(x, num_classes), name="alexnet")
    if weights == "imagenet":
        raise ValueError("weights: the AlexNet-style baseline has no ImageNet weights; "
                         "use None or a local weights file")
    if weights:
        model.load_weights(weights)
    return model


def build_resnet50v2(num_classes=NUM_CLASSES, *, input_size=IMAGE_SIZE, dropout_rate=0.3,
                     bn_momentum=0.9, dense_units=0, weights=None, augment=None, seed=None):
    """``keras.applications.ResNet50V2`` backbone with a new head (GAP, dropout, Dense logits).

    ``weights``: None (from scratch), ``"imagenet"`` (downloaded by Keras, or read from
    ``~/.keras/models/`` when placed there by hand) or a local backbone weights file.
    ``dense_units`` > 0 adds a hidden ReLU layer of that size to the head.
    ``bn_momentum`` replaces Keras' 0.99: with few steps per epoch and a high learning rate the
    moving statistics lag the weights and inference-mode accuracy swings (measured here).
    """
    _check_local_weights(weights)
    inputs = _inputs()
    x = stem(inputs, input_size, augment, "symmetric", seed)
    try:
        backbone = keras.applications.ResNet50V2(
            include_top=False, weights=weights, input_shape=(input_size, input_size, 3))
    except Exception as error:
        if weights != "imagenet":
            raise
        raise RuntimeError(
            f"weights='imagenet': could not download the ResNet50V2 ImageNet weights ({error}). "
            f"This machine may be offline: download {RESNET_IMAGENET_FILE} elsewhere and put it "
            f"in ~/.keras/models/, or pass its path as weights=PATH") from error
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if dense_units:
        x = layers.Dropout(dropout_rate, name="head_hidden_dropout")(x)
        x = layers.Dense(dense_units, activation="relu", name="head_hidden")(x)
    x = layers.Dropout(dropout_rate, name="head_dropout")(x)
    return keras.Model(inputs, _logits(x, num_classes), name="resnet50v2")


def build_vit(num_classes=NUM_CLASSES, *, input_size=IMAGE_SIZE, patch_size=6, num_layers=6,
              num_heads=4, hidden_dim=192, mlp_dim=384, dropout_rate=0.1,
              attention_dropout=0.0, pooling="class_token", weights=None, augment=None,
              seed=None, stem_layers=0, name="vit"):
    """``keras_hub.models.ViTBackbone`` with a class-token (or mean-token) head.

    ``weights="imagenet"`` loads the keras-hub preset ``vit_base_patch16_224_imagenet`` (which
    fixes the architecture: 224 px, patch 16, 12 layers, 768 dims); a local file loads backbone
    weights saved with ``backbone.save_weights``.

    ``stem_layers`` > 0 puts that many stride-2 3x3 convolutions (batch norm, ReLU) before the
    transformer, the convolutional stem of Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better"; the transformer then cuts the feature map into patches of
    ``patch_size / 2**stem_layers``, so a token still covers ``patch_size`` input pixels.
    ``pooling``: the class token, or the mean of the patch tokens (as in CCT-style small-data
    ViTs).
    """
    import keras_hub

    _check_local_weights(weights)
    if input_size % patch_size or patch_size % 2 ** stem_layers:
        raise ValueError(f"model_params.{name}.patch_size: {patch_size} must divide input_size "
                         f"{input_size}" + (f" and be a multiple of 2**stem_layers "
                                            f"({2 ** stem_layers})" if stem_layers else ""))
    if pooling not in ("class_token", "mean"):
        raise ValueError(f"model_params.{name}.pooling: {pooling!r} is not allowed; allowed "
                         f"values: class_token, mean")
    inputs = _inputs()
    x = stem(inputs, input_size, augment, "symmetric", seed)
    feature_size, channels = input_size, 3
    for index in range(stem_layers):
        # Channels grow to hidden_dim at the last layer (hidden_dim / 2**k before it).
        channels = max(16, hidden_dim // 2 ** (stem_layers - 1 - index))
        x = layers.Conv2D(channels, 3, strides=2, padding="same", use_bias=False,
                          name=f"stem_conv{index + 1}")(x)
        x = layers.BatchNormalization(name=f"stem_conv{index + 1}_bn")(x)
        x = layers.ReLU(name=f"stem_conv{index + 1}_relu")(x)
        feature_size //= 2
    if weights == "imagenet":
        if stem_layers:
            raise ValueError(f"weights: the ImageNet preset is a patchify ViT; {name} has a "
                             f"convolutional stem")
        try:
            backbone = keras_hub.models.ViTBackbone.from_preset(VIT_IMAGENET_PRESET)
        except Exception as error:
            raise RuntimeError(
                f"weights='imagenet': could not load the keras-hub preset {VIT_IMAGENET_PRESET} "
                f"({error}). This machine may be offline: download the preset elsewhere and pass "
                f"its local folder or a saved backbone weights file as weights=PATH") from error
    else:
        backbone = keras_hub.models.ViTBackbone(
            image_shape=(feature_size, feature_size, channels),
            patch_size=patch_size // 2 ** stem_layers, num_layers=num_layers,
            num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
            dropout_rate=dropout_rate, attention_dropout=attention_dropout)
        if weights:
            backbone.load_weights(weights)
    tokens = backbone(x)
    if pooling == "mean":
        x = PatchTokenMean(name="token_mean")(tokens)
    else:
        x = ClassToken(name="class_token")(tokens)
    x = layers.Dropout(dropout_rate, name="head_dropout")(x)
    return keras.Model(inputs, _logits(x, num_classes), name=name)


def build_vit_conv(num_classes=NUM_CLASSES, *, patch_size=4, stem_layers=2, num_layers=4,
                   num_heads=4, hidden_dim=128, mlp_dim=256, pooling="mean", **kwargs):
    """The ViT of :func:`build_vit` behind a convolutional stem (``stem_layers`` >= 1)."""
    if stem_layers < 1:
        raise ValueError("model_params.vit_conv.stem_layers: expected at least 1 (0 is the "
                         "plain ViT: use the model vit)")
    return build_vit(num_classes, patch_size=patch_size, stem_layers=stem_layers,
                     num_layers=num_layers, num_heads=num_heads, hidden_dim=hidden_dim,
                     mlp_dim=mlp_dim, pooling=pooling, name="vit_conv", **kwargs)


REGISTRY = {"alexnet": build_alexnet, "resnet50v2": build_resnet50v2, "vit": build_vit,
            "vit_conv": build_vit_conv}
assert tuple(REGISTRY) == MODEL_NAMES


def build_model(name: str, *, num_classes: int = NUM_CLASSES, **hyperparameters) -> keras.Model:
    """Build a registered model.

    Parameters
    ----------
    name : str
        One of ``ferlib.MODEL_NAMES``.
    num_classes : int
    **hyperparameters
        The model's parameters from ``params.model_params.<name>`` plus ``augment`` (the
        augmentation settings) and ``seed``.

    Returns
    -------
    keras.Model
        Functional model mapping uint8 ``(batch, 48, 48[, 1])`` images to logits.
    """
    if name not in REGISTRY:
        raise ValueError(f"model: unknown model {name!r}; allowed values: {', '.join(REGISTRY)}")
    return REGISTRY[name](num_classes, **hyperparameters)


AUGMENTATION_LAYERS = (Augmentation, layers.RandomFlip, layers.RandomRotation,
                       layers.RandomTranslation, layers.RandomZoom, layers.RandAugment,
                       layers.RandomErasing)


def inference_model(model: keras.Model, *, temperature: float | None = None,
                    probabilities: bool = True) -> keras.Model:
    """An inference-only copy of a trained model: augmentation layers removed, same weights.

    Augmentation is a no-op at inference, but its random ops would still reach an exported graph
    (and some exporters cannot convert them). The copy maps uint8 ``(batch, 48, 48, 1)`` to
    probabilities: ``softmax(logits / temperature)`` (``temperature`` from calibration, None for
    1), or to logits when ``probabilities`` is False.
    """
    def clone(layer):
        if isinstance(layer, AUGMENTATION_LAYERS):
            return layers.Identity(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in copy.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    # Called with training=False: a model saved before augmentation moved into ``Augmentation``
    # would otherwise run BatchNormalization in training mode when called without it.
    image = keras.Input(shape=copy.inputs[0].shape[1:], dtype=copy.inputs[0].dtype,
                        name="image")
    x = copy(image, training=False)
    if temperature is not None and temperature != 1.0:
        x = layers.Rescaling(1.0 / float(temperature), name="temperature")(x)
    if probabilities:
        x = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(image, x, name=f"{model.name}_inference")


def count_flops(model: keras.Model) -> int | None:
    """Forward FLOPs per image (multiply-adds x 2) from the TF graph profiler, if available."""
    try:
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2)
    except ImportError:
        return None
    try:
        spec = tf.TensorSpec((1, IMAGE_SIZE, IMAGE_SIZE, 1), tf.uint8)
        function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
        frozen = convert_variables_to_constants_v2(function)
        options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        options["output"] = "none"
        info = tf.compat.v1.profiler.profile(graph=frozen.graph, options=options)
        return int(info.total_float_ops)
    except Exception:
        return None
