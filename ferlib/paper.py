"""The paper's reported numbers as data, so reports can set our measurements beside its claims.

Nothing here is measured: these are the values printed in the paper, kept exactly as printed
(including the implausible ones, see NOTES).
"""

import pandas as pd

from ferlib import EMOTIONS

SOURCE = (
    "Transcribed from the paper's Tables 2-6 as given in the project's issue "
    "(Tables 2-3: per-epoch losses and seconds; Table 4: test metrics; "
    "Tables 5-6: confusion matrices in % of the true class)."
)

MODEL_DISPLAY_NAMES = {"vit": "ViT", "resnet50v2": "ResNet50V2", "alexnet": "AlexNet (Alex CNN)",
                       "vit_conv": "ViT, convolutional stem"}

PAPER_CONFUSION_MODELS = ("vit", "resnet50v2")
"""Models for which the paper prints a confusion matrix and a per-epoch table."""

PAPER_CLASS_ORDER = ("Happiness", "Sadness", "Anger", "Fear", "Neutral", "Disgust", "Surprise")
PAPER_TO_OURS = {
    "Happiness": "happy", "Sadness": "sad", "Anger": "angry", "Fear": "fear",
    "Neutral": "neutral", "Disgust": "disgust", "Surprise": "surprise",
}

HYPERPARAMETERS = {
    "resnet50v2": {
        "optimizer": "Adam with weight decay",
        "learning_rate": 1e-3,
        "batch_size": 32,
        "epochs": 50,
        "loss": "categorical cross-entropy",
    },
    "vit": {
        "num_layers": 12,
        "embedding_dim": 768,
        "num_heads": 8,
        "dropout_rate": 0.1,
        "optimizer": "AdamW",
        "learning_rate": 2e-5,
        "learning_rate_warmup": True,
        "batch_size": 16,
    },
    "common": {
        "transfer_learning": "ImageNet",
        "cross_validation": "stratified 5-fold",
        "early_stopping": True,
        "learning_rate_annealing": True,
        "hardware": "NVIDIA A100",
        "framework": "TensorFlow 2",
    },
}

# Table 4: test metrics.
_TABLE4 = {
    "vit": (0.78, 0.77, 0.76, 0.86),
    "resnet50v2": (0.76, 0.75, 0.74, 0.84),
    "alexnet": (0.75, 0.74, 0.73, 0.83),
}

# Tables 5 (ViT) and 6 (ResNet50V2): rows = true, columns = predicted, PAPER_CLASS_ORDER, %.
_CONFUSION = {
    "vit": (
        (81.54, 2.77, 1.85, 2.46, 5.23, 4.31, 1.85),
        (4.03, 80.54, 2.68, 2.01, 6.71, 2.01, 2.01),
        (3.51, 1.75, 76.02, 5.26, 8.19, 2.34, 2.92),
        (4.05, 1.69, 6.08, 79.39, 4.39, 2.03, 2.36),
        (5.82, 5.09, 8.73, 6.55, 69.09, 2.91, 1.82),
        (9.15, 3.92, 3.92, 3.27, 5.88, 71.90, 1.96),
        (6.06, 3.37, 4.04, 3.03, 2.02, 4.04, 77.44),
    ),
    "resnet50v2": (
        (83.08, 3.08, 1.54, 3.08, 4.62, 3.08, 1.54),
        (3.33, 83.33, 3.33, 1.67, 5.00, 1.67, 1.67),
        (4.41, 1.47, 73.53, 5.88, 8.82, 2.94, 2.94),
        (3.51, 1.75, 5.26, 80.70, 5.26, 1.75, 1.75),
        (5.17, 3.45, 10.34, 6.90, 68.97, 3.45, 1.72),
        (9.38, 3.13, 3.13, 4.69, 6.25, 71.88, 1.56),
        (5.08, 3.39, 3.39, 1.69, 1.69, 3.39, 81.36),
    ),
}

# Smallest per-row sample counts n (paper class order) for which every printed percentage
# is k/n rounded to 2 decimals (multiples of n fit too). Derived from Tables 5-6, not printed.
IMPLIED_ROW_TOTALS = {
    "vit": (325, 149, 171, 296, 275, 153, 297),
    "resnet50v2": (65, 60, 68, 57, 58, 64, 59),
}

# Tables 2 (ViT) and 3 (ResNet50V2): (epoch, train loss, validation loss, seconds per epoch).
_EPOCHS = {
    "vit": (
        (1, 2.30, 2.29, 55.2), (2, 2.15, 2.12, 55.4), (3, 1.99, 1.95, 55.6),
        (4, 1.85, 1.80, 55.8), (5, 1.70, 1.65, 56.0), (6, 1.55, 1.52, 56.2),
        (7, 1.40, 1.35, 56.3), (8, 1.25, 1.22, 56.5), (9, 1.09, 1.05, 56.7107),
        (10, 0.95, 0.91, 56.8964), (11, 0.80, 0.75, 57.0821), (12, 0.65, 0.59, 57.2679),
        (13, 0.51, 0.44, 57.4536), (14, 0.35, 0.29, 57.6393), (15, 0.20, 0.14, 57.825),
        (16, 0.05, 0.01, 58.0107),
    ),
    "resnet50v2": (
        (1, 2.10, 2.05, 55.3), (2, 1.95, 1.90, 55.6), (3, 1.80, 1.75, 55.7),
        (4, 1.60, 1.50, 55.9), (5, 1.30, 1.25, 56.1), (6, 1.17, 1.09, 56.29),
        (7, 0.97, 0.89, 56.48), (8, 0.78, 0.69, 56.67), (9, 0.58, 0.49, 56.86),
        (10, 0.39, 0.29, 57.05), (11, 0.19, 0.09, 57.24), (12, 0.01, 0.11, 57.43),
        (13, 0.20, 0.31, 57.62), (14, 0.39, 0.51, 57.81), (15, 0.59, 0.71, 58.0),
        (16, 0.79, 0.91, 58.19),
    ),
}

NOTES = [
    "All rows of Tables 5 and 6 sum to 100 within 0.02 (rounding).",
    "Table 3 (ResNet50V2): train and validation losses fall almost linearly to ~0 at epoch 12 "
    "and then rise linearly again; Table 2 (ViT) reaches a validation loss of 0.01. Neither "
    "is plausible for 7-class FER2013 at 76-78% accuracy; both are shown as printed.",
    "The diagonal means of Tables 5-6 (macro recall) are 76.56% for ViT and 77.55% for "
    "ResNet50V2, so the confusion matrices rank ResNet50V2 above ViT, while Table 4 ranks "
    "ViT first (recall 0.76 vs 0.74).",
    "Every percentage in Tables 5-6 is k/n for small per-class counts n (IMPLIED_ROW_TOTALS): "
    "at least 1,666 test images for ViT but as few as 431 for ResNet50V2, with different "
    "class proportions (e.g. Sadness 149 vs 60, and 149 is prime), so the two tables cannot "
    "describe the same test set of FER2013's size.",
    "Table 4 does not say whether precision and recall are macro or weighted averages.",
    "The paper gives no confusion matrix or per-epoch table for the AlexNet-style CNN.",
]


def _check_model(model, allowed):
    if model not in allowed:
        raise ValueError(f"unknown model {model!r}; the paper reports this for: {sorted(allowed)}")


def table4():
    """Table 4: the paper's test accuracy, precision, recall and AUC per model.

    Returns
    -------
    pandas.DataFrame
        Index: model names (vit, resnet50v2, alexnet); columns: accuracy, precision,
        recall, auc.
    """
    return pd.DataFrame.from_dict(
        _TABLE4, orient="index", columns=["accuracy", "precision", "recall", "auc"]
    ).rename_axis("model")


def paper_confusion(model, order="ours"):
    """Tables 5 (ViT) and 6 (ResNet50V2): confusion matrix in % of the true class.

    Parameters
    ----------
    model : {"vit", "resnet50v2"}
    order : {"ours", "paper"}
        "ours" relabels and reorders rows and columns to `ferlib.EMOTIONS`; "paper" keeps
        the paper's labels and PAPER_CLASS_ORDER.

    Returns
    -------
    pandas.DataFrame
        Rows = true class, columns = predicted class.
    """
    _check_model(model, _CONFUSION)
    frame = pd.DataFrame(_CONFUSION[model], index=list(PAPER_CLASS_ORDER),
                         columns=list(PAPER_CLASS_ORDER))
    if order == "paper":
        pass
    elif order == "ours":
        frame = frame.rename(index=PAPER_TO_OURS, columns=PAPER_TO_OURS)
        frame = frame.loc[list(EMOTIONS), list(EMOTIONS)]
    else:
        raise ValueError(f"order must be 'ours' or 'paper'; got {order!r}")
    return frame.rename_axis(index="true", columns="predicted")


def paper_epochs(model):
    """Tables 2 (ViT) and 3 (ResNet50V2): per-epoch losses and seconds, as printed.

    Parameters
    ----------
    model : {"vit", "resnet50v2"}

    Returns
    -------
    pandas.DataFrame
        16 rows; columns epoch, train_loss, val_loss, seconds_per_epoch.
    """
    _check_model(model, _EPOCHS)
    return pd.DataFrame(_EPOCHS[model],
                        columns=["epoch", "train_loss", "val_loss", "seconds_per_epoch"])
