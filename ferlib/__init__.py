"""ferlib: data, models, training, metrics and reports for the FER2013 study."""

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""Class names in the index order of the original challenge CSV's `emotion` column."""

NUM_CLASSES = len(EMOTIONS)

__version__ = "0.1.0"

MODEL_NAMES = ("alexnet", "resnet50v2", "vit", "vit_conv")
"""Models in the registry (``ferlib.models.build_model``): the three of the paper, and a ViT
with a convolutional stem (``vit`` is the plain patchify ViT the paper uses)."""

PAPER_MODELS = ("alexnet", "resnet50v2", "vit")
"""The paper's three models: a profile's default ``models``."""
