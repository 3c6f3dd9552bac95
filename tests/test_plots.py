"""Tests for ferlib.plots: each figure builds on synthetic inputs with the expected labels."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from ferlib import EMOTIONS, plots
from ferlib.metrics import softmax
from ferlib.paper import paper_confusion, paper_epochs, table4

RNG = np.random.default_rng(0)
LABELS = np.repeat(np.arange(7), 8)
IMAGES = RNG.integers(0, 256, (len(LABELS), 48, 48), dtype=np.uint8)
PROBA = softmax(RNG.normal(size=(len(LABELS), 7)) + 2 * np.eye(7)[LABELS])


def history(num_epochs=6, with_lr=False):
    epochs = np.arange(1, num_epochs + 1)
    frame = pd.DataFrame({"epoch": epochs, "loss": 2 / epochs, "val_loss": 2.2 / epochs,
                          "accuracy": 1 - 1 / (epochs + 1),
                          "val_accuracy": [0.3, 0.5, 0.6, 0.58, 0.62, 0.61][:num_epochs]})
    if with_lr:
        frame["lr"] = 1e-3 * 0.5 ** epochs
    return frame


def tick_texts(ax, axis="x"):
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [label.get_text() for label in labels]


@pytest.fixture
def check():
    """Assert a Figure came back, and close it afterwards."""
    made = []

    def checker(fig):
        assert isinstance(fig, Figure)
        made.append(fig)
        return fig

    yield checker
    for fig in made:
        fig.clear()


@pytest.mark.parametrize("with_lr", [False, True])
def test_learning_curves(check, with_lr):
    fig = check(plots.learning_curves(history(with_lr=with_lr), title="ViT"))
    assert fig.get_suptitle() == "ViT"
    assert len(fig.axes) == (3 if with_lr else 2)
    loss, accuracy = fig.axes[:2]
    assert (loss.get_ylabel(), accuracy.get_ylabel()) == ("Loss", "Accuracy")
    assert any("best epoch 5" in text.get_text() for text in accuracy.texts)
    assert [line.get_label() for line in loss.get_lines()][:2] == ["train", "validation"]
    with pytest.raises(ValueError, match="val_accuracy"):
        plots.learning_curves(history().drop(columns="val_accuracy"))


def test_learning_curves_overlay(check):
    ours = {"vit": history(), "resnet50v2": history(4)}
    paper = {"vit": paper_epochs("vit"), "resnet50v2": paper_epochs("resnet50v2")}
    fig = check(plots.learning_curves_overlay(ours, paper))
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["ViT", "ResNet50V2", "ViT (paper)", "ResNet50V2 (paper)"]
    assert fig.axes[0].get_lines()[2].get_linestyle() == "--"
    assert fig.axes[1].get_title() == "Validation loss"


def test_confusion_matrix_plot(check):
    counts = np.bincount(LABELS * 7 + PROBA.argmax(1), minlength=49).reshape(7, 7)
    fig = check(plots.confusion_matrix_plot(counts, title="ResNet50V2"))
    counts_ax, percent_ax = fig.axes[:2]  # colour bars are appended after the heatmaps
    assert fig.get_suptitle() == "ResNet50V2"
    assert tick_texts(counts_ax) == list(EMOTIONS)
    assert tick_texts(percent_ax, "y") == list(EMOTIONS)
    assert (counts_ax.get_xlabel(), counts_ax.get_ylabel()) == ("Predicted", "True")
    assert percent_ax.get_title() == "% of true class"


def test_confusion_percent_plot_uses_frame_labels(check):
    fig = check(plots.confusion_percent_plot(paper_confusion("vit"), title="Paper Table 5"))
    assert fig.axes[0].get_title() == "Paper Table 5"
    assert tick_texts(fig.axes[0]) == list(EMOTIONS)
    fig = check(plots.confusion_percent_plot(np.eye(7) * 100, EMOTIONS, "identity"))
    assert tick_texts(fig.axes[0], "y") == list(EMOTIONS)


def test_roc_curves(check):
    fig = check(plots.roc_curves(LABELS, PROBA, title="ROC"))
    ax = fig.axes[0]
    assert ax.get_title() == "ROC"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend[0].startswith("angry (AUC ") and legend[-1] == "chance"
    assert len(legend) == 8


def test_per_class_f1_bars(check):
    fig = check(plots.per_class_f1_bars({"vit": np.linspace(0.3, 0.9, 7),
                                         "alexnet": np.full(7, 0.5)}))
    ax = fig.axes[0]
    assert tick_texts(ax) == list(EMOTIONS)
    assert [text.get_text() for text in ax.get_legend().get_texts()] == \
        ["ViT", "AlexNet (Alex CNN)"]
    assert len(ax.patches) == 14


def test_metric_comparison_with_intervals_and_paper(check):
    measured = table4() - 0.1
    for metric in ("accuracy", "precision", "recall", "auc"):
        measured[f"{metric}_low"] = measured[metric] - 0.02
        measured[f"{metric}_high"] = measured[metric] + 0.02
    fig = check(plots.metric_comparison(measured, table4()))
    ax = fig.axes[0]
    assert tick_texts(ax) == ["accuracy", "precision", "recall", "auc"]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "paper (claimed)" in legend and "ViT" in legend
    markers = [line for line in ax.get_lines() if line.get_marker() == "D"]
    assert len(markers) == 12
    check(plots.metric_comparison(table4()[["accuracy", "auc"]]))


def test_seconds_per_epoch(check):
    timings = {"alexnet": pd.DataFrame({"epoch": [1, 2, 3], "seconds": [10.0, 9.0, 9.5]}),
               "vit": paper_epochs("vit")}
    fig = check(plots.seconds_per_epoch(timings))
    ax = fig.axes[0]
    assert ax.get_ylabel() == "Seconds"
    assert ax.get_lines()[0].get_label().startswith("AlexNet (Alex CNN) (median 10 s)")


def test_class_distribution(check):
    counts = pd.DataFrame({"train": np.arange(7) * 100, "test": np.arange(7) * 10},
                          index=list(EMOTIONS))
    fig = check(plots.class_distribution(counts))
    assert tick_texts(fig.axes[0]) == list(EMOTIONS)
    assert fig.axes[0].get_legend().get_title().get_text() == "split"


def test_sample_grid(check):
    fig = check(plots.sample_grid(IMAGES[..., None], LABELS, per_class=10))
    assert len(fig.axes) == 70
    assert fig.axes[0].get_ylabel().startswith("angry")
    assert fig.axes[60].get_ylabel().startswith("neutral")
    assert len(fig.axes[9].images) == 0  # only 8 examples per class


def test_misclassified_grid(check):
    fig = check(plots.misclassified_grid(IMAGES, LABELS, PROBA, n=5))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    wrong = (PROBA.argmax(1) != LABELS).sum()
    assert len(titles) == min(5, wrong)
    assert "→" in titles[0] and "(p=" in titles[0]
    assert any(name in titles[0].split("→")[0] for name in EMOTIONS)
    confidences = [float(title.split("p=")[1].rstrip(")")) for title in titles]
    assert confidences == sorted(confidences, reverse=True)
    check(plots.misclassified_grid(IMAGES, LABELS, np.eye(7)[LABELS]))  # nothing wrong


def test_augmentation_preview(check):
    def augment(batch):  # float RGB output, as a model's preprocessing layers give
        shifted = np.roll(batch, RNG.integers(-3, 4), axis=2).astype(np.float32) / 255
        return np.repeat(shifted[..., None], 3, axis=-1)

    fig = check(plots.augmentation_preview(IMAGES, augment, n_images=3, n_variants=4))
    assert len(fig.axes) == 15
    assert fig.axes[0].get_title() == "original"
    assert fig.axes[4].get_title() == "variant 4"


def test_save_figure_writes_png(check, tmp_path):
    fig = check(plots.class_distribution(pd.DataFrame({"train": range(7)}, index=EMOTIONS)))
    path = plots.save_figure(fig, tmp_path / "deep" / "dir" / "distribution.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [item.name for item in path.parent.iterdir()] == ["distribution.png"]


def test_publish_saves_and_displays_the_png(tmp_path):
    fig = plots.per_class_f1_bars({"vit": np.linspace(0, 1, 7)})
    published = plots.publish(fig, tmp_path / "figures", "f1")
    png = published._repr_png_()
    assert png.startswith(b"\x89PNG") and (tmp_path / "figures" / "f1.png").read_bytes() == png
    assert published.figure is fig


def test_reliability_diagram_panels_and_overlay(check):
    from ferlib.metrics import apply_temperature, expected_calibration_error, reliability_bins

    bins = reliability_bins(LABELS, PROBA)
    softened = reliability_bins(LABELS, apply_temperature(PROBA, 2.0))
    fig = check(plots.reliability_diagram({"vit": bins,
                                           "alexnet": {"before": bins, "after": softened}}))
    vit, alexnet = fig.axes
    assert vit.get_title() == "ViT" and vit.get_xlabel().startswith("Confidence")
    ece = expected_calibration_error(LABELS, PROBA)
    assert f"ECE {ece:.3f}" in [text.get_text() for text in vit.get_legend().get_texts()]
    assert "perfect calibration" in [line.get_label() for line in vit.get_lines()]
    assert [line.get_label().split(":")[0] for line in alexnet.get_lines()][1:] == [
        "before", "after"]
    fig = check(plots.reliability_diagram({"vit": bins, "resnet50v2": softened}, overlay=True))
    assert len(fig.axes) == 1
    assert [line.get_label().split(":")[0] for line in fig.axes[0].get_lines()][1:] == [
        "ViT", "ResNet50V2"]


def test_saliency_grid(check):
    maps = RNG.random((10, 48, 48))
    fig = check(plots.saliency_grid(IMAGES[:10], maps, titles=[f"face {i}" for i in range(10)],
                                    num_columns=4, cmap="inferno"))
    assert len(fig.axes) == 12
    assert len(fig.axes[0].images) == 2 and fig.axes[0].images[1].get_cmap().name == "inferno"
    assert fig.axes[9].get_title() == "face 9" and not fig.axes[11].images
    with pytest.raises(ValueError, match="10 images but 3 maps"):
        plots.saliency_grid(IMAGES[:10], maps[:3])


def test_mean_saliency_maps(check):
    maps = RNG.random((7, 48, 48))
    missing = maps.copy()
    missing[1] = np.nan
    fig = check(plots.mean_saliency_maps({"vit": maps, "alexnet": missing},
                                         background=IMAGES[0]))
    assert len(fig.axes) == 14
    assert fig.axes[0].get_ylabel() == "ViT" and fig.axes[7].get_ylabel().startswith("AlexNet")
    assert tick_texts(fig.axes[0]) == [] and fig.axes[6].get_title() == "neutral"
    assert fig.axes[8].texts[0].get_text() == "no images" and not fig.axes[8].images


def test_table_reads_like_a_papers():
    import pandas as pd

    frame = pd.DataFrame({"model": ["a", "b"], "accuracy": [0.61234, np.nan],
                          "learning_rate": [4.9e-10, 1e-3]}).set_index("model")
    page = plots.table(frame, precision=3, formats={"learning_rate": "{:.2e}"}).to_html()
    assert "row_heading" not in page and "NaN" not in page and "nan" not in page
    assert ">model<" in page  # the index became a column
    assert ">0.612<" in page and ">–<" in page and ">4.90e-10<" in page
