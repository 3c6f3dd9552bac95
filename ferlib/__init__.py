"""ferlib: data, models, training, metrics and reports for the FER2013 study."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The checkout: ``params/``, ``notebooks/``, ``runs/``, ``reports/`` and ``data/`` are under it."""

IMAGE_SIZE = 48
"""FER2013's images are 48x48 gray; every reader, model and exporter uses this size."""

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""Class names in the index order of the original challenge CSV's `emotion` column."""

NUM_CLASSES = len(EMOTIONS)

__version__ = "0.1.0"

MODEL_NAMES = ("alexnet", "resnet50v2", "vit", "vit_conv")
"""Models in the registry (``ferlib.models.build_model``): the three of the paper, and a ViT
with a convolutional stem (``vit`` is the plain patchify ViT the paper uses)."""

PAPER_MODELS = ("alexnet", "resnet50v2", "vit")
"""The paper's three models: a profile's default ``models``."""


def _register_layers(_keras_module) -> None:
    """Import ferlib.models once Keras is imported, so that its custom layers are registered
    and plain ``keras.saving.load_model(path)`` of a trained model finds them after
    ``import ferlib``."""
    import importlib

    importlib.import_module("ferlib.models")


# A post-import hook (wrapt's, the maintained implementation) rather than importing Keras here:
# Keras with TensorFlow takes 9-15 s to import on the 2-core machines, and most commands
# (status, search --best, data-summary) never need it.
try:
    import wrapt as _wrapt
except ImportError:  # pragma: no cover - TensorFlow depends on wrapt
    _wrapt = None
if _wrapt is not None:
    _wrapt.register_post_import_hook(_register_layers, "keras")
