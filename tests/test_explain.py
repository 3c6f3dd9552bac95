"""Tests for ferlib.explain: known answers on a toy model, every registered model, checks."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ferlib import EMOTIONS, MODEL_NAMES, explain
from ferlib.models import build_model

RNG = np.random.default_rng(0)
FACES = RNG.integers(0, 256, (4, 48, 48), dtype=np.uint8)
TINY = {"alexnet": {"width": 0.25, "dense_units": 16},
        "resnet50v2": {"input_size": 32},
        "vit": {"patch_size": 6, "num_layers": 2, "num_heads": 2, "hidden_dim": 16,
                "mlp_dim": 32},
        "vit_conv": {"patch_size": 4, "stem_layers": 1, "num_layers": 2, "num_heads": 2,
                     "hidden_dim": 16, "mlp_dim": 32}}
QUADRANT = (slice(0, 24), slice(0, 24))


def quadrant_model():
    """Logit 0 sees only the top-left quadrant: the image is cropped to it (zeros elsewhere)
    before a convolution with positive weights, pooled, then weighted positively; the other
    logits are constant 0."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(48, 48, 1), dtype="uint8", name="image")
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Cropping2D(((0, 24), (0, 24)))(x)
    x = layers.ZeroPadding2D(((0, 24), (0, 24)))(x)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", use_bias=False,
                      kernel_initializer=keras.initializers.Constant(0.1), name="conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    kernel = np.zeros((4, 7), np.float32)
    kernel[:, 0] = 1.0
    logits = layers.Dense(7, kernel_initializer=keras.initializers.Constant(kernel),
                          name="logits")(x)
    return keras.Model(inputs, logits, name="quadrant")


@pytest.fixture(scope="module")
def toy():
    return quadrant_model()


@pytest.fixture(scope="module")
def bright_faces():
    return RNG.integers(180, 256, (3, 48, 48), dtype=np.uint8)


def quadrant_share(maps):
    maps = np.asarray(maps, dtype=float)
    return maps[:, QUADRANT[0], QUADRANT[1]].sum() / maps.sum()


@pytest.fixture(scope="module")
def tiny_models():
    return {}


def tiny(tiny_models, name):
    if name not in tiny_models:
        tiny_models[name] = build_model(name, **TINY[name])
    return tiny_models[name]


# ----------------------------------------------------------------------------- known answers

def test_grad_cam_mass_lies_where_the_logit_looks(toy, bright_faces):
    assert explain.default_layer(toy) == "conv"
    maps = explain.grad_cam(toy, bright_faces, class_index=0, layer="conv")
    assert maps.shape == (3, 48, 48) and maps.dtype == np.float32
    assert maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1)
    assert quadrant_share(maps) > 0.8


def test_occlusion_mass_lies_where_the_logit_looks(toy, bright_faces):
    maps = explain.occlusion(toy, bright_faces)   # the predicted class is 0
    assert maps.shape == (3, 48, 48)
    assert maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1)
    assert quadrant_share(maps) > 0.8


def test_sanity_check_fails_when_the_weights_are_not_reinitialised(toy, bright_faces,
                                                                   monkeypatch):
    monkeypatch.setattr(explain, "reinitialised", lambda model, seed=0: model)
    result = explain.randomization_check(toy, bright_faces, method="grad_cam")
    assert result["spearman"] == pytest.approx(1.0)
    assert result["passes"] is False and result["images"] == 3


def test_sanity_check_result_and_reinitialisation(tiny_models):
    model = tiny(tiny_models, "alexnet")
    first, second = explain.reinitialised(model, seed=3), explain.reinitialised(model, seed=3)
    kernel = model.get_layer("conv1").get_weights()[0]
    assert not np.allclose(first.get_layer("conv1").get_weights()[0], kernel)
    assert np.array_equal(first.get_layer("conv1").get_weights()[0],
                          second.get_layer("conv1").get_weights()[0])
    result = explain.randomization_check(model, FACES, reinitialised_model=first)
    per_image = np.asarray(result["spearman_per_image"])
    assert len(per_image) == len(FACES) and result["threshold"] == 0.5
    defined = per_image[np.isfinite(per_image)]    # a constant map has no ranking
    assert result["constant_maps"] == len(FACES) - len(defined)
    if len(defined):
        assert result["spearman"] == pytest.approx(defined.mean()) and result["spearman"] < 1
    assert result["passes"] == (len(defined) > 0 and result["spearman"] < 0.5)


# ----------------------------------------------------------------------------- registry

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_gets_maps(tiny_models, name):
    model = tiny(tiny_models, name)
    layer = explain.default_layer(model)
    expected = {"alexnet": "conv5_relu", "resnet50v2": "resnet50v2/post_relu"}
    if name.startswith("vit"):
        assert layer.endswith("/transformer_block_2")
    else:
        assert layer == expected[name]
    for method in ("auto", "occlusion"):
        maps = explain.saliency(model, FACES[:2], method=method)
        assert maps.shape == (2, 48, 48) and maps.dtype == np.float32
        assert 0 <= maps.min() and maps.max() <= 1 + 1e-6


def test_vit_uses_token_grad_cam_with_gradients(tiny_models):
    model = tiny(tiny_models, "vit")
    description = explain.saliency_method(model)
    assert "8x8 patch-token grid" in description and "attention" in description
    split = explain._split(model)
    tokens = np.asarray(split.features(FACES, training=False))
    _, classes, gradients = explain._logits_and_gradients(split.head, tokens, None)
    assert tokens.shape == gradients.shape == (len(FACES), 65, 16)
    assert np.abs(gradients[:, 1:]).sum(axis=(1, 2)).min() > 0   # patch tokens matter
    assert explain.grad_cam(model, FACES, class_index=classes).max() > 0
    first_block = explain.default_layer(model).replace("_2", "_1")
    assert explain.grad_cam(model, FACES[:1], layer=first_block).shape == (1, 48, 48)


def test_grad_cam_inside_a_nested_backbone(tiny_models):
    model = tiny(tiny_models, "resnet50v2")
    assert "1x1 grid" in explain.saliency_method(model)   # 32 px: the last block is 1x1
    assert "4x4 grid" in explain.saliency_method(model, layer="resnet50v2/conv2_block3_out")
    maps = explain.grad_cam(model, FACES[:2], layer="resnet50v2/conv2_block3_out")
    assert maps.shape == (2, 48, 48)
    with pytest.raises(ValueError, match="a skip connection bypasses it"):
        explain.grad_cam(model, FACES[:1], layer="resnet50v2/conv4_block6_1_relu")


def test_clear_errors(tiny_models):
    model = tiny(tiny_models, "alexnet")
    with pytest.raises(ValueError, match="expected gray 48x48"):
        explain.grad_cam(model, np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="allowed values: auto, grad_cam, occlusion"):
        explain.saliency(model, FACES, method="lime")
    with pytest.raises(ValueError, match="has no layer 'conv9'"):
        explain.grad_cam(model, FACES, layer="conv9")
    with pytest.raises(ValueError, match=r"needs a \(batch, height, width, channels\)"):
        explain.grad_cam(model, FACES, layer="fc1")
    with pytest.raises(ValueError, match=r"class indices in \[0, 6\]"):
        explain.grad_cam(model, FACES, class_index=7)


def test_unsupported_backend_is_named(toy, bright_faces, monkeypatch):
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(NotImplementedError, match="not 'torch'.*occlusion"):
        explain.grad_cam(toy, bright_faces)


@pytest.mark.jax
def test_grad_cam_on_jax(tmp_path):
    pytest.importorskip("jax")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numpy as np
        from test_explain import quadrant_model, quadrant_share
        from ferlib import explain
        faces = np.random.default_rng(0).integers(180, 256, (3, 48, 48), dtype=np.uint8)
        maps = explain.grad_cam(quadrant_model(), faces, class_index=0)
        assert quadrant_share(maps) > 0.8, quadrant_share(maps)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "jax"}, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


# ----------------------------------------------------------------------------- regions, classes

def test_region_shares_and_description():
    areas = explain.region_areas()
    assert sum(areas[name] for name in ("eyes", "mouth", "elsewhere")) == pytest.approx(1)
    mouth = np.zeros((48, 48))
    mouth[34:40, 16:32] = 1
    eyes = np.zeros((48, 48))
    eyes[14:20, 8:40] = 1
    uniform = np.ones((48, 48))
    shares = explain.region_shares(np.stack([mouth, np.zeros((48, 48))]))
    assert shares["mouth"] == pytest.approx(1) and shares["maps"] == 1   # the empty map is skipped
    assert explain.region_shares(uniform)["eyes"] == pytest.approx(areas["eyes"])

    maps = np.stack([eyes, uniform, uniform, mouth, uniform, eyes + 0.2 * mouth, uniform])
    text = explain.describe_regions(maps)
    assert "the mouth leads for happy (100%)" in text
    assert "the eyes and brows lead for angry (100%) and surprise" in text
    assert "neither region stands out for disgust, fear, sad and neutral" in text
    assert explain.describe_regions({"happy": mouth}).startswith("Over all classes 0% ")


def test_mean_maps_by_class_and_select_faces(toy):
    images = RNG.integers(180, 256, (9, 48, 48), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 3, 3, 3, 3])   # no images of classes 2, 4, 5, 6
    means = explain.mean_maps_by_class(toy, images, labels, method="grad_cam", per_class=2)
    assert means.shape == (7, 48, 48)
    assert np.isnan(means[[2, 4, 5, 6]]).all() and np.isfinite(means[[0, 1, 3]]).all()

    proba = np.full((9, 7), 0.1)
    proba[np.arange(9), [0, 0, 3, 1, 0, 3, 3, 2, 3]] = 0.4
    proba[2, 3] = 0.9
    faces = explain.select_faces(labels, proba, correct=1, wrong=1)
    assert list(faces["index"]) == [0, 2, 3, 4, 5, 7]
    assert faces.loc[1, "title"] == "angry → happy 0.90" and not faces.loc[1, "correct"]
    assert faces.loc[0, "true"] == EMOTIONS[0] and faces.loc[0, "correct"]


def test_occlusion_after_the_model_predicted_unbatched_channels(tiny_models):
    """Training code predicts (N, 48, 48) batches; explain must not break that model's predict."""
    model = tiny(tiny_models, "alexnet")
    before = model.predict(FACES, verbose=0)
    assert explain.occlusion(model, FACES[:1], stride=8).shape == (1, 48, 48)
    assert np.allclose(model.predict(FACES, verbose=0), before)
