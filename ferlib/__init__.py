"""ferlib: data, models, training, metrics and reports for the FER2013 study."""

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
"""Class names in the index order of the original challenge CSV's `emotion` column."""

NUM_CLASSES = len(EMOTIONS)

__version__ = "0.1.0"

MODEL_NAMES = ("alexnet", "resnet50v2", "vit")
"""Models in the registry (``ferlib.models.build_model``), cheapest first."""
