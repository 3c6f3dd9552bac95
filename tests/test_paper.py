"""Tests for ferlib.paper: the transcribed tables keep their shape and internal consistency."""

import numpy as np
import pytest

from ferlib import EMOTIONS, PAPER_MODELS
from ferlib import paper


def test_table4_shape_and_values():
    table = paper.table4()
    assert table.shape == (3, 4)
    assert list(table.index) == ["vit", "resnet50v2", "alexnet"]
    assert list(table.columns) == ["accuracy", "precision", "recall", "auc"]
    assert table.loc["vit", "accuracy"] == 0.78
    assert table.loc["alexnet", "auc"] == 0.83
    assert set(table.index) == set(PAPER_MODELS) <= set(paper.MODEL_DISPLAY_NAMES)


@pytest.mark.parametrize("model", ["vit", "resnet50v2"])
def test_confusion_rows_sum_to_100(model):
    for order in ("ours", "paper"):
        frame = paper.paper_confusion(model, order=order)
        assert frame.shape == (7, 7)
        np.testing.assert_allclose(frame.sum(axis=1), 100, atol=0.1)


@pytest.mark.parametrize("model", ["vit", "resnet50v2"])
def test_confusion_percentages_are_whole_counts(model):
    # Backs the NOTES claim: each printed row is k/n for the implied row total n.
    frame = paper.paper_confusion(model, order="paper").to_numpy()
    for row, total in zip(frame, paper.IMPLIED_ROW_TOTALS[model]):
        counts = np.round(row * total / 100)
        assert counts.sum() == total
        np.testing.assert_allclose(100 * counts / total, row, atol=0.006)


def test_reordering_keeps_cells():
    ours = paper.paper_confusion("vit")
    assert list(ours.index) == list(EMOTIONS) and list(ours.columns) == list(EMOTIONS)
    assert ours.loc["happy", "happy"] == 81.54
    assert ours.loc["neutral", "neutral"] == 69.09
    assert ours.loc["disgust", "happy"] == 9.15  # paper row Disgust, column Happiness
    original = paper.paper_confusion("vit", order="paper")
    assert list(original.index) == list(paper.PAPER_CLASS_ORDER)
    assert np.diag(original).sum() == pytest.approx(np.diag(ours).sum())
    assert paper.paper_confusion("resnet50v2").loc["surprise", "surprise"] == 81.36


def test_epoch_tables():
    for model in ("vit", "resnet50v2"):
        table = paper.paper_epochs(model)
        assert table.shape == (16, 4)
        assert list(table.columns) == ["epoch", "train_loss", "val_loss", "seconds_per_epoch"]
        assert list(table["epoch"]) == list(range(1, 17))
    assert paper.paper_epochs("vit")["val_loss"].iloc[-1] == 0.01
    assert paper.paper_epochs("resnet50v2")["train_loss"].idxmin() == 11  # epoch 12


def test_unknown_model_and_order_are_explained():
    with pytest.raises(ValueError, match="resnet50v2"):
        paper.paper_confusion("alexnet")
    with pytest.raises(ValueError, match="order"):
        paper.paper_confusion("vit", order="alphabetical")
    assert "Tables 2-6" in paper.SOURCE
    assert paper.NOTES and paper.HYPERPARAMETERS["vit"]["num_heads"] == 8
