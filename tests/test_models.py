"""Tests for ferlib.models: the registry, the shared stem (augmentation), saving
and reloading, local weights files and the errors people see without a network.

Every model is built tiny (a few thousand to a few hundred thousand parameters, except
ResNet50V2, which is 23M parameters at any input size and is therefore built as few times as
possible: one module-scoped instance per registry name serves the build, forward, save/load and
augmentation tests).
"""

import keras
import numpy as np
import pytest

import ferlib.models
from ferlib import MODEL_NAMES, NUM_CLASSES
from ferlib.models import REGISTRY, build_model, count_flops

# Keras' TensorFlow backend calls np.array(tensor, copy=False) internally (NumPy 2 warns).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

TINY = {
    "alexnet": {"width": 0.25, "dense_units": 16},
    "resnet50v2": {"input_size": 32},
    "vit": {"patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64},
    "vit_conv": {"patch_size": 8, "stem_layers": 2, "num_layers": 1, "num_heads": 2,
                 "hidden_dim": 32, "mlp_dim": 64},
}
AUGMENT = {"flip": True, "rotation": 0.05, "translation": 0.1, "zoom": 0.1}
BATCH = 4


def to_numpy(tensor) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def uint8_batch(seed: int = 0, batch: int = BATCH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 48, 48), dtype=np.uint8)


def build_tiny(name: str, **overrides) -> keras.Model:
    return build_model(name, **{"augment": AUGMENT, "seed": 0, **TINY[name], **overrides})


def perturb(variables) -> None:
    """Shift every float variable, so a file can only be matched by loading it (not by chance
    of an identical random initialisation)."""
    for variable in variables:
        if "float" in str(variable.dtype):
            variable.assign(variable + 0.01)


@pytest.fixture(scope="module", params=MODEL_NAMES)
def built(request):
    """(name, model) built once per registry name for the whole module."""
    return request.param, build_tiny(request.param)


# ----------------------------------------------------------------------------- registry

def test_registry_matches_model_names():
    assert tuple(REGISTRY) == MODEL_NAMES
    assert set(TINY) == set(MODEL_NAMES), "a new model needs a tiny config in this test module"


def test_unknown_model_name_lists_allowed_names():
    with pytest.raises(ValueError, match="unknown model 'lenet'") as error:
        build_model("lenet")
    for name in MODEL_NAMES:
        assert name in str(error.value)


def test_vit_patch_size_must_divide_input_size():
    with pytest.raises(ValueError, match="patch_size"):
        build_model("vit", **{**TINY["vit"], "patch_size": 5})


def test_count_flops_of_tiny_alexnet():
    flops = count_flops(build_model("alexnet", **TINY["alexnet"]))
    assert isinstance(flops, int) and flops > 0


# ----------------------------------------------------------------------------- build, forward, save

def test_forward_uint8_batches_give_finite_logits(built):
    name, model = built
    images = uint8_batch()
    assert model.name == name
    assert tuple(model.input.shape) == (None, 48, 48, 1) and model.input.dtype == "uint8"
    outputs = {}
    for shape in [(BATCH, 48, 48), (BATCH, 48, 48, 1)]:
        logits = to_numpy(model(images.reshape(shape), training=False))
        assert logits.shape == (BATCH, NUM_CLASSES)
        assert logits.dtype == np.float32
        assert np.isfinite(logits).all()
        outputs[len(shape)] = logits
    # With or without the channel axis it is the same image, hence the same logits.
    np.testing.assert_allclose(outputs[3], outputs[4], atol=1e-5)
    np.testing.assert_array_equal(to_numpy(model(images, training=False)), outputs[3])


def test_save_and_reload_keras_file(built, tmp_path):
    name, model = built
    images = uint8_batch(seed=1)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    np.testing.assert_allclose(to_numpy(loaded(images, training=False)),
                               to_numpy(model(images, training=False)), atol=1e-5)


# ----------------------------------------------------------------------------- augmentation

def test_augmentation_active_in_training_only(built):
    name, model = built
    stem = keras.Model(model.input, model.get_layer("gray_to_rgb").output)
    images = uint8_batch(seed=2)
    first, second = (to_numpy(stem(images, training=True)) for _ in range(2))
    plain, plain_again = (to_numpy(stem(images, training=False)) for _ in range(2))
    assert np.abs(first - second).max() > 1e-2, "two training calls should augment differently"
    assert np.abs(first - plain).max() > 1e-2, "training should augment"
    np.testing.assert_array_equal(plain, plain_again)
    size = TINY[name].get("input_size", 48)
    assert plain.shape == (BATCH, size, size, 3)
    if size == 48:  # nothing but rescaling and channel repetition in inference
        expected = np.repeat(images[..., None] / np.float32(255), 3, axis=-1)
        np.testing.assert_allclose(plain, expected, atol=1e-6)


def test_no_augmentation_layers_without_augment_settings():
    model = build_model("alexnet", augment=None, **TINY["alexnet"])
    assert not [layer for layer in model.layers if layer.name.startswith("random_")]


def test_inference_model_drops_augmentation_and_keeps_the_weights(built, tmp_path):
    name, model = built
    images = uint8_batch(seed=3)
    # (a fresh clone would have other random weights: equal outputs need the copied weights)
    logits = to_numpy(model(images, training=False)).astype(np.float64)
    copy = ferlib.models.inference_model(model, temperature=1.5)
    layers = [layer for layer in copy._flatten_layers() if layer is not copy]
    assert not [layer for layer in layers
                if isinstance(layer, ferlib.models.AUGMENTATION_LAYERS)]
    assert any(isinstance(layer, ferlib.models.AUGMENTATION_LAYERS)
               for layer in model._flatten_layers())  # the study model keeps its own
    scaled = logits / 1.5
    expected = np.exp(scaled - scaled.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(to_numpy(copy(images[..., None], training=False)), expected,
                               atol=1e-5)
    path = tmp_path / "inference.keras"
    copy.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(to_numpy(reloaded(images[..., None], training=False)), expected,
                               atol=1e-5)
    raw = ferlib.models.inference_model(model, probabilities=False)
    np.testing.assert_allclose(to_numpy(raw(images[..., None], training=False)), logits,
                               atol=1e-4)


# ----------------------------------------------------------------------------- seeds

def test_derived_seeds_are_distinct_reproducible_and_none_stays_none():
    seeds = {ferlib.models.derived_seed(42, stream) for stream in
             ("flip", "rotation", "translation", "zoom", "mixup", "cutmix")}
    assert len(seeds) == 6 and all(0 <= seed < 2 ** 31 for seed in seeds)
    assert ferlib.models.derived_seed(42, "flip") == ferlib.models.derived_seed(42, "flip")
    assert ferlib.models.derived_seed(42, "epoch", 1) != ferlib.models.derived_seed(42, "epoch", 2)
    assert ferlib.models.derived_seed(None, "flip") is None


# ----------------------------------------------------------------------------- local weights files

def test_alexnet_local_weights_file_reproduces_outputs(tmp_path):
    source = build_tiny("alexnet")
    perturb(source.weights)
    path = tmp_path / "alexnet.weights.h5"
    source.save_weights(path)
    loaded = build_tiny("alexnet", weights=str(path))
    images = uint8_batch(seed=5)
    np.testing.assert_allclose(to_numpy(loaded(images, training=False)),
                               to_numpy(source(images, training=False)), atol=1e-6)


def test_resnet50v2_local_backbone_weights_file(tmp_path):
    reference = keras.applications.ResNet50V2(include_top=False, weights=None,
                                              input_shape=(32, 32, 3))
    perturb(reference.weights)
    path = tmp_path / "r.weights.h5"
    reference.save_weights(path)
    model = build_model("resnet50v2", input_size=32, weights=str(path))
    [backbone] = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    expected, actual = reference.get_weights(), backbone.get_weights()
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        np.testing.assert_array_equal(got, want)


def test_vit_local_backbone_weights_file(tmp_path):
    import keras_hub

    def backbone_of(model):
        [backbone] = [layer for layer in model.layers
                      if isinstance(layer, keras_hub.models.ViTBackbone)]
        return backbone

    source = build_tiny("vit")
    perturb(backbone_of(source).weights)
    path = tmp_path / "vit_backbone.weights.h5"
    backbone_of(source).save_weights(path)
    loaded = build_tiny("vit", weights=str(path))
    for got, want in zip(backbone_of(loaded).get_weights(), backbone_of(source).get_weights()):
        np.testing.assert_array_equal(got, want)
    # Only the backbone comes from the file; give both the same new head, then compare outputs.
    loaded.get_layer("logits").set_weights(source.get_layer("logits").get_weights())
    images = uint8_batch(seed=6)
    np.testing.assert_allclose(to_numpy(loaded(images, training=False)),
                               to_numpy(source(images, training=False)), atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_missing_weights_file_is_a_clear_error(name, tmp_path):
    missing = tmp_path / "nowhere" / "weights.h5"
    with pytest.raises(FileNotFoundError, match="no file") as error:
        build_model(name, weights=str(missing), **TINY[name])
    assert str(missing) in str(error.value)


# ----------------------------------------------------------------------------- "imagenet" offline

def _offline(*args, **kwargs):
    raise OSError("URL fetch failure: [Errno -3] Temporary failure in name resolution")


def test_resnet50v2_imagenet_offline_says_how_to_supply_the_file(monkeypatch):
    monkeypatch.setattr(keras.applications, "ResNet50V2", _offline)
    with pytest.raises(RuntimeError) as error:
        build_model("resnet50v2", weights="imagenet", input_size=32)
    message = str(error.value)
    assert ferlib.models.RESNET_IMAGENET_FILE in message
    assert "~/.keras/models" in message and "weights=PATH" in message
    assert isinstance(error.value.__cause__, OSError)


def test_vit_imagenet_offline_says_how_to_supply_the_preset(monkeypatch):
    import keras_hub

    monkeypatch.setattr(keras_hub.models.ViTBackbone, "from_preset", classmethod(_offline))
    with pytest.raises(RuntimeError) as error:
        build_model("vit", weights="imagenet")
    message = str(error.value)
    assert ferlib.models.VIT_IMAGENET_PRESET in message and "weights=PATH" in message
    assert isinstance(error.value.__cause__, OSError)


def test_alexnet_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("alexnet", weights="imagenet", **TINY["alexnet"])


def test_calling_the_model_without_training_is_inference(built):
    """Augmentation runs only in fit: ``model(x)`` (no training argument) must neither augment
    nor switch BatchNormalization to batch statistics."""
    name, model = built
    images = uint8_batch(seed=4)
    default = to_numpy(model(images[..., None]))
    np.testing.assert_allclose(default, to_numpy(model(images[..., None], training=False)),
                               atol=1e-5)
    np.testing.assert_allclose(default, to_numpy(model.predict(images[..., None], verbose=0)),
                               atol=1e-4)


def test_import_ferlib_is_enough_for_plain_keras_loading(tmp_path):
    """A new user's two lines: ``import ferlib`` then ``keras.saving.load_model``, in a fresh
    process (Keras imported after ferlib, as people write it)."""
    import subprocess
    import sys

    path = tmp_path / "tiny.keras"
    build_tiny("alexnet").save(path)  # holds the Augmentation layer
    script = ("import ferlib, keras, numpy\n"
              f"model = keras.saving.load_model({str(path)!r})\n"
              "print(model(numpy.zeros((1, 48, 48, 1), 'uint8')).shape)\n")
    env = {**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("(1, 7)")
    quick = subprocess.run([sys.executable, "-c", "import ferlib, sys; "
                            "print('keras' in sys.modules)"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert quick.stdout.strip() == "False"  # importing ferlib alone stays light
