"""Tests for ferlib.config: profiles, validation messages, overrides, data path resolution."""

import sys

import pytest
import yaml

import ferlib.config
from ferlib import MODEL_NAMES, PAPER_MODELS
import ferlib.data
from ferlib.config import PARAMS_DIR, SCHEMA, load_params, model_settings, parse_overrides, validate
from ferlib.data import DatasetNotFoundError, resolve_data_path

PROFILES = sorted(path.stem for path in PARAMS_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    """Tests decide themselves whether FER2013_PATH is set."""
    monkeypatch.delenv("FER2013_PATH", raising=False)


def test_the_three_profiles_exist():
    assert {"smoke", "quick", "paper"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_loads_and_validates(profile):
    params = load_params(profile)
    assert params["profile"] == profile
    assert set(params) == set(SCHEMA)
    assert params["models"] and set(params["models"]) <= set(MODEL_NAMES)
    assert isinstance(params["data"]["path"], str)
    for name in MODEL_NAMES:
        settings = model_settings(params, name)
        assert settings["model"] == name
        assert set(settings["train"]) == set(SCHEMA["train"])
        assert set(settings["model_params"]) == set(SCHEMA["model_params"][name])
    # The resolved params are saved into the run directory; they must load back unchanged.
    assert validate(yaml.safe_load(yaml.safe_dump(params))) == params


def test_profiles_describe_themselves():
    for profile in PROFILES:
        raw = yaml.safe_load((PARAMS_DIR / f"{profile}.yaml").read_text())
        assert "description" in raw, profile


def test_defaults_fill_everything():
    params = validate({})
    assert params["seed"] == 42
    assert params["models"] == list(PAPER_MODELS)
    assert params["train"]["epochs"] == 30
    assert params["train_overrides"] == {name: {} for name in MODEL_NAMES}
    assert isinstance(params["train"]["learning_rate"], float)


@pytest.mark.parametrize("raw, key, allowed", [
    ({"epochs": 3}, "'epochs'", "train"),
    ({"train": {"epoch": 3}}, "'train.epoch'", "epochs"),
    ({"model_params": {"vit": {"patch": 4}}}, "'model_params.vit.patch'", "patch_size"),
    ({"model_params": {"lenet": {}}}, "'model_params.lenet'", "resnet50v2"),
    ({"train_overrides": {"vit": {"epoch": 3}}}, "'train_overrides.vit.epoch'", "epochs"),
    ({"data": {"limit": 5}}, "'data.limit'", "limit_per_split"),
], ids=["top", "train.epoch", "model_params", "unknown-model-section", "train_overrides",
        "data"])
def test_unknown_key_names_key_and_allowed_keys(raw, key, allowed):
    with pytest.raises(ValueError) as error:
        validate(raw)
    message = str(error.value)
    assert key in message
    assert "allowed keys" in message and allowed in message


def test_unknown_key_in_overrides_of_a_profile():
    with pytest.raises(ValueError, match=r"train\.epoch.*allowed keys:.*epochs"):
        load_params("smoke", overrides={"train": {"epoch": 3}})


@pytest.mark.parametrize("raw, key", [
    ({"train": {"epochs": "ten"}}, "train.epochs"),
    ({"train": {"epochs": 2.5}}, "train.epochs"),
    ({"train": {"epochs": True}}, "train.epochs"),
    ({"train": {"learning_rate": True}}, "train.learning_rate"),
    ({"augment": {"rotation": False}}, "augment.rotation"),
    ({"augment": {"flip": "yes"}}, "augment.flip"),
    ({"seed": "42"}, "seed"),
    ({"models": "vit"}, "models"),
    ({"model_params": {"vit": {"patch_size": 6.0}}}, "model_params.vit.patch_size"),
    ({"train_overrides": {"alexnet": {"epochs": "22"}}}, "train_overrides.alexnet.epochs"),
    ({"train": "fast"}, "train"),
], ids=["str-for-int", "float-for-int", "bool-for-int", "bool-for-number", "bool-for-float",
        "str-for-bool", "str-seed", "str-models", "nested-model", "override", "not-a-mapping"])
def test_wrong_type_names_key(raw, key):
    with pytest.raises(ValueError) as error:
        validate(raw)
    message = str(error.value)
    assert message.startswith(key + ":") or f"{key}:" in message
    assert "expected" in message


def test_bool_message_says_boolean():
    with pytest.raises(ValueError, match=r"train\.learning_rate: expected int or float, got a "
                                         r"boolean"):
        validate({"train": {"learning_rate": True}})


def test_choice_lists_allowed_values():
    with pytest.raises(ValueError, match=r"train\.optimizer: 'rmsprop'.*allowed values: "
                                         r"adam, adamw, sgd"):
        validate({"train": {"optimizer": "rmsprop"}})


def test_numbers_accept_ints_and_become_floats():
    params = validate({"train": {"learning_rate": 1, "budget_minutes": 20}})
    assert params["train"]["learning_rate"] == 1.0
    assert isinstance(params["train"]["learning_rate"], float)
    assert params["train"]["budget_minutes"] == 20
    assert validate({"train": {"budget_minutes": None}})["train"]["budget_minutes"] is None


@pytest.mark.parametrize("raw, key", [
    ({"train": {"budget_minutes": "22"}}, "train.budget_minutes"),
    ({"train_overrides": {"vit": {"budget_minutes": True}}}, "train_overrides.vit.budget_minutes"),
], ids=["str", "bool-in-override"])
def test_wrong_type_for_optional_number_names_key(raw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ": expected"):
        validate(raw)


def test_optional_number_becomes_float_like_other_numbers():
    assert isinstance(validate({"train": {"budget_minutes": 20}})["train"]["budget_minutes"],
                      float)


def test_unknown_model_name_lists_allowed_values():
    with pytest.raises(ValueError) as error:
        validate({"models": ["vit", "resnet"]})
    message = str(error.value)
    assert "models" in message and "'resnet'" in message
    assert all(name in message for name in MODEL_NAMES)
    params = load_params("smoke")
    with pytest.raises(ValueError, match="allowed values: alexnet, resnet50v2, vit"):
        model_settings(params, "lenet")


@pytest.mark.parametrize("raw, fragment", [
    ({"cv_folds": 1}, "cv_folds"),
    ({"cv_folds": -2}, "cv_folds"),
    ({"data": {"limit_per_split": {"training": 10}}}, "data.limit_per_split.training"),
    ({"data": {"limit_per_split": {"train": "10"}}}, "data.limit_per_split.train"),
    ({"data": {"on_error": "ignore"}}, "data.on_error"),
])
def test_other_invalid_values(raw, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        validate(raw)


def test_train_overrides_merge_in_model_settings():
    params = load_params("smoke", overrides={
        "train": {"epochs": 7, "learning_rate": 0.003},
        "train_overrides": {"vit": {"learning_rate": 0.01, "optimizer": "sgd"}},
        "model_params": {"vit": {"num_layers": 2}},
    })
    assert params["train_overrides"]["vit"] == {"learning_rate": 0.01, "optimizer": "sgd"}
    vit = model_settings(params, "vit")
    assert vit["train"]["learning_rate"] == 0.01
    assert vit["train"]["optimizer"] == "sgd"
    assert vit["train"]["epochs"] == 7  # not overridden: the shared value, not a default
    assert vit["model_params"]["num_layers"] == 2
    assert vit["seed"] == params["seed"]
    alexnet = model_settings(params, "alexnet")
    assert alexnet["train"]["learning_rate"] == 0.003
    assert alexnet["train"]["optimizer"] == params["train"]["optimizer"]
    # settings are copies: changing them does not change params
    vit["train"]["epochs"] = 99
    vit["augment"]["flip"] = False
    assert params["train"]["epochs"] == 7 and params["augment"]["flip"] is True


@pytest.mark.parametrize("backend, compiled", [("tensorflow", False), ("jax", True),
                                               ("torch", False)])
def test_jax_always_compiles_its_train_step(backend, compiled, monkeypatch):
    """train.jit_compile keeps XLA off TensorFlow's CPU steps; under JAX, False would run
    every step op by op (slower on an H200 than on this CPU), so JAX always compiles."""
    monkeypatch.setattr(ferlib.config, "keras_backend", lambda: backend)
    params = load_params("smoke")
    assert params["train"]["jit_compile"] is False
    assert model_settings(params, "alexnet")["train"]["jit_compile"] is compiled
    assert params["train"]["jit_compile"] is False  # params themselves are not changed


def test_keras_backend_is_read_without_importing_keras(monkeypatch):
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert ferlib.config.keras_backend() == "jax"
    assert "keras" not in sys.modules


def test_quick_profile_overrides():
    params = load_params("quick")
    for name, override in yaml.safe_load(
            (PARAMS_DIR / "quick.yaml").read_text()).get("train_overrides", {}).items():
        settings = model_settings(params, name)
        for key, value in override.items():
            assert settings["train"][key] == value, (name, key)


def test_parse_overrides():
    overrides = parse_overrides(["train.epochs=3", "models=[vit]"])
    assert overrides == {"train": {"epochs": 3}, "models": ["vit"]}
    assert parse_overrides(["train_overrides.vit.learning_rate=0.0001", "data.path=/x/y.csv",
                            "train.early_stopping_patience=null", "augment.flip=false"]) == {
        "train_overrides": {"vit": {"learning_rate": 1e-4}}, "data": {"path": "/x/y.csv"},
        "train": {"early_stopping_patience": None}, "augment": {"flip": False}}
    assert parse_overrides([]) == {} and parse_overrides(None) == {}
    params = load_params("smoke", overrides)
    assert params["train"]["epochs"] == 3 and params["models"] == ["vit"]
    with pytest.raises(ValueError, match="train.epochs"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ValueError, match="train.epochs"):
        load_params("smoke", parse_overrides(["train.epochs=ten"]))


def test_scientific_notation_is_a_number(tmp_path):
    assert parse_overrides(["train.learning_rate=1e-4"]) == {"train": {"learning_rate": 1e-4}}
    path = tmp_path / "sci.yaml"
    path.write_text("train:\n  learning_rate: 2e-5\n")
    assert load_params(str(path))["train"]["learning_rate"] == pytest.approx(2e-5)


def test_fer2013_path_env_overrides_the_file(tmp_path, monkeypatch):
    data_file = tmp_path / "mine.csv"
    data_file.write_text("emotion,pixels,Usage\n")
    profile = tmp_path / "custom.yaml"
    profile.write_text(yaml.safe_dump({"data": {"path": str(tmp_path / "other.zip")}}))
    assert load_params(str(profile))["data"]["path"] == str(tmp_path / "other.zip")
    monkeypatch.setenv("FER2013_PATH", str(data_file))
    assert load_params(str(profile))["data"]["path"] == str(data_file)
    assert load_params("smoke")["data"]["path"] == str(data_file)
    assert resolve_data_path() == data_file
    assert resolve_data_path(str(tmp_path / "other.zip")) == data_file


def test_data_path_found_in_default_locations(tmp_path, monkeypatch):
    monkeypatch.setattr(ferlib.data, "PROJECT_ROOT", tmp_path)
    (tmp_path / "data" / "fer2013").mkdir(parents=True)
    assert resolve_data_path() == tmp_path / "data" / "fer2013"
    (tmp_path / "data" / "fer2013.zip").write_bytes(b"")
    assert resolve_data_path() == tmp_path / "data" / "fer2013.zip"  # zip is looked at first
    (tmp_path / "mine.csv").write_text("")
    assert resolve_data_path("mine.csv") == tmp_path / "mine.csv"  # relative to the project


def test_data_path_not_found_explains_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ferlib.data, "PROJECT_ROOT", tmp_path)
    with pytest.raises(DatasetNotFoundError) as error:
        resolve_data_path()
    message = str(error.value)
    assert "FER2013_PATH" in message
    assert "fer2013.csv" in message and "emotion,pixels,Usage" in message  # challenge CSV
    assert "FER-2013" in message and "train/<class>/" in message           # images archive
    assert str(tmp_path / "data" / "fer2013.zip") in message               # where it looked
    assert isinstance(error.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="nowhere.csv"):
        resolve_data_path(str(tmp_path / "nowhere.csv"))
    # Loading a profile does not need the data yet.
    assert load_params("smoke")["data"]["path"] == str(tmp_path / "data" / "fer2013.zip")


def test_load_params_accepts_a_yaml_path(tmp_path):
    path = tmp_path / "my_profile.yaml"
    path.write_text("models: [vit]\ntrain:\n  epochs: 1\nmodel_params:\n  vit: {num_layers: 1}\n")
    params = load_params(str(path))
    assert params["profile"] == "my_profile"
    assert params["models"] == ["vit"]
    assert params["train"]["epochs"] == 1
    assert params["model_params"]["vit"]["num_layers"] == 1
    assert params["train"]["batch_size"] == 64  # default
    assert load_params(path)["profile"] == "my_profile"  # a Path works too
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert load_params(str(empty))["profile"] == "empty"


def test_unknown_profile_lists_available_profiles():
    with pytest.raises(ValueError) as error:
        load_params("nonexistent")
    message = str(error.value)
    assert "nonexistent" in message
    assert all(profile in message for profile in PROFILES)


def test_bad_profile_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: ten\n")
    with pytest.raises(ValueError, match=r"train\.epochs"):
        load_params(str(path))


@pytest.mark.parametrize("profile", sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")))
def test_shipped_profiles_fix_epochs_not_minutes(profile):
    """The same profile trains identically on any machine: epochs decide, and the wall-clock
    safety stop is off in every shipped profile."""
    params = load_params(profile)
    for name in params["models"]:
        settings = model_settings(params, name)["train"]
        assert settings["budget_minutes"] is None, f"{profile}: {name} has a budget"
        assert settings["epochs"] >= 1
