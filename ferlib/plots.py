"""Figures for the reports: learning curves, confusion matrices, ROC, comparisons, image grids.

Every function returns a `matplotlib.figure.Figure` built without pyplot, so nothing is
registered globally: figures never pile up across many calls and notebooks do not display
them twice. In a notebook, make the figure the cell's last expression (or `display(fig)`).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from ferlib import EMOTIONS
from ferlib.paper import MODEL_DISPLAY_NAMES


def _figure(nrows=1, ncols=1, figsize=(6, 4), **subplot_kw):
    """A pyplot-free Figure and its axes in seaborn's whitegrid style."""
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=figsize, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def _display_name(model):
    return MODEL_DISPLAY_NAMES.get(model, model)


def _as_gray(image):
    """Drop a trailing single channel so imshow treats the image as grayscale."""
    image = np.asarray(image)
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def _grouped_bars(ax, frame, yerr_low=None, yerr_high=None):
    """Bars for frame.loc[group, series]: one cluster per index entry, one colour per column.

    Returns the x centre of each bar as a (groups, series) array, for overlays.
    """
    num_groups, num_series = frame.shape
    width = 0.8 / num_series
    centers = np.arange(num_groups)[:, None] + (np.arange(num_series) - (num_series - 1) / 2) * width
    for j, column in enumerate(frame.columns):
        yerr = None
        if yerr_low is not None:
            # A percentile interval need not contain the point estimate (small samples).
            yerr = np.clip(np.vstack([frame[column] - yerr_low[column],
                                      yerr_high[column] - frame[column]]), 0, None)
        ax.bar(centers[:, j], frame[column], width=width, label=str(column), yerr=yerr,
               capsize=3 if yerr is not None else 0)
    ax.set_xticks(np.arange(num_groups), [str(name) for name in frame.index])
    return centers


def _heatmap(ax, matrix, class_names, fmt, title, colorbar_label, vmax=None):
    sns.heatmap(matrix, ax=ax, annot=True, fmt=fmt, cmap="Blues", vmin=0, vmax=vmax,
                xticklabels=class_names, yticklabels=class_names, square=True,
                cbar_kws={"label": colorbar_label}, annot_kws={"size": 8})
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)


def learning_curves(history, title=None):
    """Training and validation loss and accuracy per epoch, best epoch marked.

    Parameters
    ----------
    history : pandas.DataFrame
        Columns epoch, loss, val_loss, accuracy, val_accuracy, and optionally learning_rate
        (or lr; shown in a third panel on a log scale) and ``<column>_sd`` (drawn as a band:
        the spread over cross-validation folds).
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    required = ["epoch", "loss", "val_loss", "accuracy", "val_accuracy"]
    missing = [column for column in required if column not in history]
    if missing:
        raise ValueError(f"history is missing column(s) {missing}; expected {required} (+ lr)")
    if "learning_rate" in history and "lr" not in history:
        history = history.rename(columns={"learning_rate": "lr"})
    has_lr = "lr" in history
    fig, axes = _figure(1, 3 if has_lr else 2, figsize=(14 if has_lr else 10, 4))
    axes = axes[0]
    best = history.loc[history["val_accuracy"].idxmax()]

    for ax, metric, label in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        for column, name in ((metric, "train"), (f"val_{metric}", "validation")):
            line, = ax.plot(history["epoch"], history[column], marker="o", markersize=3,
                            label=name)
            if f"{column}_sd" in history:  # cross-validation: mean ± sd over the folds
                ax.fill_between(history["epoch"], history[column] - history[f"{column}_sd"],
                                history[column] + history[f"{column}_sd"], alpha=0.2,
                                color=line.get_color(), linewidth=0)
        ax.axvline(best["epoch"], color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.legend()
    axes[1].annotate(f"best epoch {best['epoch']:g}\nval acc {best['val_accuracy']:.3f}",
                     xy=(best["epoch"], best["val_accuracy"]), xytext=(8, -30),
                     textcoords="offset points", fontsize=9,
                     arrowprops={"arrowstyle": "->", "color": "gray"})
    if has_lr:
        axes[2].plot(history["epoch"], history["lr"], color="tab:green")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("Epoch")
        axes[2].set_ylabel("Learning rate")
        axes[2].set_title("Learning rate")
    if title:
        fig.suptitle(title)
    return fig


def learning_curves_overlay(histories, paper=None, title="Loss per epoch: all models"):
    """Every model's training and validation loss on shared axes, with the paper's dashed.

    Parameters
    ----------
    histories : dict of str -> pandas.DataFrame
        Model name -> history with columns epoch, loss, val_loss.
    paper : dict of str -> pandas.DataFrame, optional
        Model name -> the paper's Tables 2-3 (columns epoch, train_loss, val_loss).
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, axes = _figure(1, 2, figsize=(11, 4), sharey=True)
    paper = paper or {}
    names = list(dict.fromkeys([*histories, *paper]))
    colors = dict(zip(names, sns.color_palette(n_colors=len(names))))
    for ax, ours, theirs, label in ((axes[0, 0], "loss", "train_loss", "Training loss"),
                                    (axes[0, 1], "val_loss", "val_loss", "Validation loss")):
        for name, history in histories.items():
            ax.plot(history["epoch"], history[ours], color=colors[name], marker="o",
                    markersize=3, label=_display_name(name))
        for name, table in paper.items():
            ax.plot(table["epoch"], table[theirs], color=colors[name], linestyle="--",
                    label=f"{_display_name(name)} (paper)")
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Loss")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def confusion_matrix_plot(cm_counts, class_names=EMOTIONS, title=None):
    """Confusion matrix as counts and as % of the true class, side by side.

    Parameters
    ----------
    cm_counts : array_like, shape (C, C)
        Counts, rows = true class, columns = predicted class.
    class_names : sequence of str
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    counts = np.asarray(cm_counts)
    percent = 100.0 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, axes = _figure(1, 2, figsize=(14, 5.5))
    _heatmap(axes[0, 0], counts, class_names, "d", "Counts", "images")
    _heatmap(axes[0, 1], percent, class_names, ".1f", "% of true class", "%", vmax=100)
    if title:
        fig.suptitle(title)
    return fig


def confusion_percent_plot(cm_percent, class_names=None, title=None):
    """A single confusion heatmap already in % of the true class (e.g. the paper's Tables 5-6).

    Parameters
    ----------
    cm_percent : numpy.ndarray or pandas.DataFrame, shape (C, C)
    class_names : sequence of str, optional
        Defaults to the DataFrame's index, else `ferlib.EMOTIONS`.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    if class_names is None:
        class_names = list(cm_percent.index) if isinstance(cm_percent, pd.DataFrame) else EMOTIONS
    fig, axes = _figure(figsize=(7, 5.5))
    _heatmap(axes[0, 0], np.asarray(cm_percent, dtype=float), list(class_names), ".1f",
             title or "% of true class", "%", vmax=100)
    return fig


def roc_curves(y_true, proba, class_names=EMOTIONS, title=None):
    """One-vs-rest ROC curve per class, AUC in the legend.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    proba : array_like, shape (N, C)
    class_names : sequence of str
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
    fig, axes = _figure(figsize=(6, 5.5))
    ax = axes[0, 0]
    for k, name in enumerate(class_names):
        positive = y_true == k
        if positive.all() or not positive.any():
            continue  # ROC is undefined without both positives and negatives
        false_positive_rate, true_positive_rate, _ = roc_curve(positive, proba[:, k])
        auc = roc_auc_score(positive, proba[:, k])
        ax.plot(false_positive_rate, true_positive_rate, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title or "ROC curves (one-vs-rest)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def per_class_f1_bars(f1_by_model, class_names=EMOTIONS, title="F1 per class"):
    """Grouped bars of per-class F1, one colour per model.

    Parameters
    ----------
    f1_by_model : dict of str -> sequence of float
        Model name -> one F1 per class.
    class_names : sequence of str
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    frame = pd.DataFrame({_display_name(name): list(values)
                          for name, values in f1_by_model.items()}, index=list(class_names))
    fig, axes = _figure(figsize=(10, 4))
    ax = axes[0, 0]
    _grouped_bars(ax, frame)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Emotion")
    ax.set_ylabel("F1")
    ax.set_title(title)
    ax.legend()
    return fig


def metric_comparison(measured, paper=None, title="Measured vs paper (Table 4)"):
    """Grouped bars of our metrics per model, with the paper's claimed values as markers.

    Parameters
    ----------
    measured : pandas.DataFrame
        Index: model names; columns: metrics (e.g. accuracy, precision, recall, auc), and
        optionally `<metric>_low` / `<metric>_high` for confidence-interval error bars.
    paper : pandas.DataFrame, optional
        Same layout (e.g. `ferlib.paper.table4()`); models or metrics it lacks are skipped.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    metrics = [column for column in measured.columns
               if not column.endswith(("_low", "_high"))]
    values = measured[metrics].T  # rows = metrics (clusters), columns = models (colours)
    low = high = None
    if all(f"{metric}_low" in measured and f"{metric}_high" in measured for metric in metrics):
        low, high = (measured[[f"{metric}_{end}" for metric in metrics]].T.set_axis(metrics)
                     .rename(columns=_display_name) for end in ("low", "high"))
    fig, axes = _figure(figsize=(9, 4.5))
    ax = axes[0, 0]
    centers = _grouped_bars(ax, values.rename(columns=_display_name), low, high)
    if paper is not None:
        labelled = False
        for j, model in enumerate(values.columns):
            for i, metric in enumerate(metrics):
                if model in paper.index and metric in paper.columns:
                    ax.plot(centers[i, j], paper.loc[model, metric], marker="D", color="black",
                            markersize=6, linestyle="none",
                            label=None if labelled else "paper (claimed)")
                    labelled = True
    ax.set_ylim(0, 1)
    ax.set_xlabel("Metric")
    ax.set_ylabel("Score")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def seconds_per_epoch(timings, title="Seconds per epoch"):
    """Wall-clock seconds per training epoch for each model.

    Parameters
    ----------
    timings : dict of str -> pandas.DataFrame
        Model name -> frame with columns epoch and seconds (or seconds_per_epoch, as in
        `ferlib.paper.paper_epochs`).
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, axes = _figure(figsize=(8, 4))
    ax = axes[0, 0]
    for name, frame in timings.items():
        seconds = frame["seconds"] if "seconds" in frame else frame["seconds_per_epoch"]
        ax.plot(frame["epoch"], seconds, marker="o", markersize=3,
                label=f"{_display_name(name)} (median {np.median(seconds):.0f} s)")
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Seconds")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def class_distribution(counts, title="Images per class and split"):
    """Grouped bars of image counts per class, one colour per split.

    Parameters
    ----------
    counts : pandas.DataFrame
        Index: class names; columns: splits.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, axes = _figure(figsize=(10, 4))
    ax = axes[0, 0]
    _grouped_bars(ax, counts)
    ax.set_xlabel("Emotion")
    ax.set_ylabel("Images")
    ax.set_title(title)
    ax.legend(title="split")
    return fig


def _image_grid(num_rows, num_columns, cell_size=1.3):
    fig, axes = _figure(num_rows, num_columns,
                        figsize=(cell_size * num_columns, cell_size * num_rows + 0.4))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    return fig, axes


def sample_grid(images, labels, per_class=6, class_names=EMOTIONS, seed=0,
                title="Random examples per class"):
    """Random example images, one row per class.

    Parameters
    ----------
    images : numpy.ndarray
        (N, H, W) or (N, H, W, 1) grayscale.
    labels : array_like of int, shape (N,)
    per_class : int
        Images per row.
    class_names : sequence of str
    seed : int
        Seed for which examples are drawn.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fig, axes = _image_grid(len(class_names), per_class)
    for k, name in enumerate(class_names):
        members = np.flatnonzero(labels == k)
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False)
        for j, index in enumerate(chosen):
            axes[k, j].imshow(_as_gray(images[index]), cmap="gray", vmin=0, vmax=255)
        for j in range(len(chosen), per_class):
            axes[k, j].axis("off")
        axes[k, 0].set_ylabel(f"{name}\n(n={len(members)})", fontsize=9)
    fig.suptitle(title)
    return fig


def misclassified_grid(images, y_true, proba, n=24, class_names=EMOTIONS, num_columns=8,
                       title="Most confident mistakes"):
    """The `n` wrong predictions made with the highest confidence.

    Parameters
    ----------
    images : numpy.ndarray
        (N, H, W) or (N, H, W, 1) grayscale.
    y_true : array_like of int, shape (N,)
    proba : array_like, shape (N, C)
    n : int
        Number of examples shown.
    class_names : sequence of str
    num_columns : int
    title : str

    Returns
    -------
    matplotlib.figure.Figure
        Each image captioned "true → pred (p=0.87)".
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
    y_pred = proba.argmax(axis=1)
    confidence = proba.max(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:n]
    num_rows = max(1, -(-len(shown) // num_columns))
    fig, axes = _image_grid(num_rows, num_columns, cell_size=1.6)
    for ax, index in zip(axes.flat, shown):
        ax.imshow(_as_gray(images[index]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{class_names[y_true[index]]} → {class_names[y_pred[index]]}\n"
                     f"(p={confidence[index]:.2f})", fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if not len(shown):
        axes[0, 0].text(0, 0.5, "no misclassified examples", transform=axes[0, 0].transAxes)
    fig.suptitle(title)
    return fig


def _for_display(image):
    """Scale one augmented image to [0, 1] so float and uint8 outputs look alike."""
    image = _as_gray(np.asarray(image, dtype=np.float64))
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def augmentation_preview(images, augment, n_images=4, n_variants=5,
                         title="Training augmentation"):
    """Original images in the first column, then `n_variants` augmented versions of each.

    Parameters
    ----------
    images : numpy.ndarray
        uint8 (N, 48, 48) batch; the first `n_images` are shown.
    augment : callable
        Maps a uint8 batch (n, 48, 48) to an augmented batch (n, H, W) or (n, H, W, C),
        float or uint8 (a tensor is fine); called once per variant.
    n_images, n_variants : int
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    batch = np.asarray(images[:n_images])
    variants = [np.asarray(augment(batch)) for _ in range(n_variants)]
    fig, axes = _image_grid(len(batch), n_variants + 1)
    for i in range(len(batch)):
        axes[i, 0].imshow(_as_gray(batch[i]), cmap="gray", vmin=0, vmax=255)
        for j, variant in enumerate(variants, start=1):
            axes[i, j].imshow(_for_display(variant[i]), cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("original", fontsize=9)
    for j in range(1, n_variants + 1):
        axes[0, j].set_title(f"variant {j}", fontsize=9)
    fig.suptitle(title)
    return fig


def save_figure(fig, path, dpi=100):
    """Write `fig` as PNG atomically (temp file in the same folder, then rename).

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    path : str or os.PathLike
        Destination; parent folders are created.
    dpi : int

    Returns
    -------
    pathlib.Path
        The written path.
    """
    from ferlib.runs import atomic_save

    path = Path(path)
    atomic_save(lambda temporary: fig.savefig(temporary, format="png", dpi=dpi), path)
    return path


class PublishedFigure:
    """A figure saved as PNG that notebooks display as that PNG, whatever the backend.

    Our figures are pyplot-free, so IPython only renders them when the inline backend has
    registered its formatter; with ``MPLBACKEND=Agg`` (as under ``make report``) it would print
    ``<Figure ...>`` instead. ``_repr_png_`` makes the saved file the displayed image.
    """

    def __init__(self, figure, path):
        self.figure, self.path = figure, Path(path)

    def _repr_png_(self):
        return self.path.read_bytes()


def publish(fig, directory, name, dpi=100):
    """Save ``fig`` as ``directory/name.png``; return it wrapped so a notebook cell shows it.

    Returns
    -------
    PublishedFigure
        ``.figure`` is the Figure, ``.path`` the PNG; displays as the PNG in notebooks.
    """
    path = Path(directory) / f"{name}.png"
    save_figure(fig, path, dpi=dpi)
    return PublishedFigure(fig, path)


def compute_curves(curves, budget_hours=None, budget_flops=None,
                   title="PublicTest accuracy against compute"):
    """Best-so-far PublicTest accuracy of each model against training hours, and against
    cumulative training FLOPs (log scale) where they were counted
    (``ferlib.results.compute_curves``), with the equal-compute budgets as dashed lines."""
    with_flops = "flops" in curves and curves.flops.notna().any()
    fig, axes = _figure(1, 2 if with_flops else 1, figsize=(12 if with_flops else 7, 4))
    panels = [("hours", budget_hours, "training hours (epochs x median epoch seconds)",
               lambda b: f"{b:.2f} h")]
    if with_flops:
        panels.append(("flops", budget_flops, "cumulative training FLOPs (3 x forward)",
                       lambda b: f"{b:.1e} FLOPs"))
    for ax, (column, budget, xlabel, label) in zip(axes[0], panels):
        for model, curve in curves.dropna(subset=[column]).groupby("model", sort=False):
            ax.plot(curve[column], curve.best_so_far, marker=".", label=model)
        if budget is not None:
            ax.axvline(budget, color="grey", linestyle="--", linewidth=1,
                       label=f"equal compute ({label(budget)})")
        if column == "flops":
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="best PublicTest accuracy so far")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def table(frame, precision: int = 3, formats: dict | None = None):
    """A DataFrame as a paper's table: no index column, "–" for missing values, floats
    rounded (``formats``: column -> format string for columns that need another, such as a
    learning rate in ``"{:.2e}"``). Returns a pandas Styler, which notebooks display as HTML."""
    import pandas as pd

    frame = frame.reset_index() if not isinstance(frame.index, pd.RangeIndex) else frame
    # escape="html": cells and headers may hold strings from parameters or data (model and
    # class names, recipes); a Styler, unlike DataFrame.to_html, does not escape by default.
    styler = frame.style.hide(axis="index").format(precision=precision, na_rep="–",
                                                   thousands=",", escape="html")
    styler = styler.format_index(escape="html", axis=1)
    chosen = {column: format_string for column, format_string in (formats or {}).items()
              if column in frame}
    if chosen:
        styler = styler.format(chosen, subset=list(chosen), na_rep="–", escape="html")
    return styler.set_table_attributes('class="ferlib-table"')


# ------------------------------------------------------------------- recipe search

def ablation_bars(tables: dict, title="Training techniques against the adopted recipe"):
    """One panel per model: each variant's mean paired PublicTest difference to the baseline
    (same seeds), in points, with the range over seeds as whiskers
    (``ferlib.ablation.ablation_table``). None when no variant has a paired run."""
    tables = {name: table.dropna(subset=["vs baseline (paired mean)"])
              for name, table in tables.items()}
    tables = {name: table for name, table in tables.items() if len(table)}
    if not tables:
        return None
    fig, axes = _figure(1, len(tables), figsize=(5 * len(tables), 0.5 + 0.5 * max(
        len(table) for table in tables.values()) + 1.2))
    for ax, (name, table) in zip(axes[0], tables.items()):
        mean = 100 * table["vs baseline (paired mean)"].to_numpy()
        low = mean - 100 * table["paired min"].to_numpy()
        high = 100 * table["paired max"].to_numpy() - mean
        colours = ["tab:green" if value > 0 else "tab:red" for value in mean]
        ax.barh(table.variant, mean, xerr=[low, high], color=colours, capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set(title=_display_name(name), xlabel="PublicTest vs baseline (points, same seeds)")
    fig.suptitle(title)
    return fig


_STATE_COLOURS = {"complete": "tab:blue", "pruned": "tab:orange"}


def search_history(trials, curves, title="Recipe search"):
    """Two panels: each trial's PublicTest accuracy by trial number with the best so far
    (``ferlib.search.trials_table``), and every trial's accuracy per epoch, pruned trials
    dashed (``ferlib.search.curves_table``)."""
    fig, axes = _figure(1, 2, figsize=(11, 3.8))
    history, curve_axis = axes[0]
    counted = trials[trials.state.isin(list(_STATE_COLOURS))]
    final = counted.set_index("trial").publictest_accuracy
    last = curves.groupby("trial").publictest_accuracy.last() if len(curves) else final
    for state, colour in _STATE_COLOURS.items():
        chosen = counted[counted.state == state]
        values = chosen.publictest_accuracy.where(chosen.publictest_accuracy.notna(),
                                                  chosen.trial.map(last))
        history.scatter(chosen.trial, values, color=colour, label=state, s=28)
    complete = counted[counted.state == "complete"].sort_values("trial")
    if len(complete):
        history.step(complete.trial, complete.publictest_accuracy.cummax(), where="post",
                     color="black", linewidth=1, label="best so far")
    history.set(xlabel="trial", ylabel="PublicTest accuracy", title=f"{title}: history")
    history.legend(fontsize=8)
    for trial, frame in curves.groupby("trial"):
        pruned = frame.state.iloc[0] == "pruned"
        curve_axis.plot(frame.epoch, frame.publictest_accuracy, linewidth=1,
                        linestyle="--" if pruned else "-",
                        color=_STATE_COLOURS["pruned" if pruned else "complete"], alpha=0.8)
    curve_axis.set(xlabel="epoch", ylabel="PublicTest accuracy",
                   title="per epoch (dashed: pruned)")
    return fig


def search_importances(importance, title="Parameter importance (fANOVA)"):
    """Horizontal bars of ``ferlib.search.importances``; None when there is nothing to show."""
    if not importance:
        return None
    series = pd.Series(importance).sort_values()
    fig, axes = _figure(figsize=(6, 0.35 * len(series) + 1))
    axes[0, 0].barh(series.index, series.values, color="tab:blue")
    axes[0, 0].set(xlabel="importance", title=title)
    return fig


def search_slices(trials, space, title="Each parameter against PublicTest accuracy"):
    """One small scatter per searched parameter over the complete trials (log axes for log
    ranges): the slice plot."""
    complete = trials[trials.state == "complete"]
    names = [name for name in space if name in complete]
    if not len(complete) or not names:
        return None
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig, axes = _figure(rows, columns, figsize=(3.2 * columns, 2.6 * rows))
    for index, axis in enumerate(axes.flat):
        if index >= len(names):
            axis.set_visible(False)
            continue
        name = names[index]
        values = complete[name]
        categorical = "choices" in space[name]
        if categorical:
            labels = [str(choice) for choice in space[name]["choices"]]
            positions = values.astype(str).map({label: i for i, label in enumerate(labels)})
            axis.set_xticks(range(len(labels)), labels, fontsize=7)
            values = positions
        axis.scatter(values, complete.publictest_accuracy, s=18, color="tab:blue")
        if space[name].get("log"):
            axis.set_xscale("log")
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
    fig.suptitle(title)
    return fig


# ------------------------------------------------------------------- calibration and saliency

def _ece_from_bins(bins):
    """Top-label ECE from a reliability table (``ferlib.metrics.reliability_bins``)."""
    counts = np.asarray(bins["count"], dtype=float)
    gaps = np.abs(np.nan_to_num(np.asarray(bins["accuracy"], dtype=float)
                                - np.asarray(bins["confidence"], dtype=float)))
    return float((counts * gaps).sum() / counts.sum()) if counts.sum() else float("nan")


def reliability_diagram(bins_by_model, overlay=False, title="Reliability diagram"):
    """Accuracy against confidence per bin, with the diagonal of perfect calibration.

    Parameters
    ----------
    bins_by_model : dict
        Model name -> a ``ferlib.metrics.reliability_bins`` frame, or -> a dict of such frames
        drawn in the same panel (e.g. ``{"before": ..., "after (T=1.6)": ...}``).
    overlay : bool
        False: one panel per model, accuracy per bin as bars (outlined gap to the diagonal) or
        as lines for several curves. True: every curve in one panel.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
        The ECE of each curve (recomputed from the bins) is in its legend entry.
    """
    panels = {_display_name(name): (curves if isinstance(curves, dict) else {"": curves})
              for name, curves in bins_by_model.items()}
    if not panels:
        raise ValueError("bins_by_model: no model to draw")
    if overlay:
        panels = {"": {" ".join(part for part in (model, label) if part): frame
                       for model, curves in panels.items() for label, frame in curves.items()}}
    fig, axes = _figure(1, len(panels), figsize=(4.2 * len(panels) + 0.6, 4.4))
    for ax, (model, curves) in zip(axes[0], panels.items()):
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1,
                label="perfect calibration")
        for label, frame in curves.items():
            used = frame[frame["count"] > 0]
            ece = _ece_from_bins(frame)
            name = f"{label}: ECE {ece:.3f}" if label else f"ECE {ece:.3f}"
            if len(curves) == 1 and not overlay:
                width = (frame["upper"] - frame["lower"]).iloc[0]
                centres = (used["lower"] + used["upper"]) / 2
                ax.bar(centres, used["accuracy"], width=width * 0.95, label=name,
                       color="tab:blue", alpha=0.8)
                ax.bar(centres, used["confidence"] - used["accuracy"],
                       bottom=used["accuracy"], width=width * 0.95, fill=False,
                       edgecolor="tab:red", hatch="//", linewidth=0.6, label="gap")
            else:
                ax.plot(used["confidence"], used["accuracy"], marker="o", markersize=3,
                        label=name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("Confidence (top probability)")
        ax.set_ylabel("Accuracy")
        if model:
            ax.set_title(model)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    return fig


def _overlay(ax, image, saliency_map, cmap, alpha):
    ax.imshow(_as_gray(image), cmap="gray", vmin=0, vmax=255)
    if saliency_map is not None and np.isfinite(saliency_map).any():
        ax.imshow(saliency_map, cmap=cmap, alpha=alpha, vmin=0,
                  vmax=max(float(np.nanmax(saliency_map)), 1e-12))


def saliency_grid(images, maps, titles=None, num_columns=8, cmap="jet", alpha=0.45,
                  title="Saliency"):
    """Faces with their saliency maps overlaid, in rows of ``num_columns``.

    Parameters
    ----------
    images : numpy.ndarray
        uint8 (N, 48, 48) or (N, 48, 48, 1).
    maps : numpy.ndarray, shape (N, 48, 48)
        Maps in [0, 1] (``ferlib.explain.saliency``).
    titles : sequence of str, optional
        One caption per face (e.g. ``ferlib.explain.select_faces(...)["title"]``).
    num_columns : int
    cmap : str
        Colour map of the overlay ("jet", "inferno", ...).
    alpha : float
        Opacity of the overlay.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    images, maps = np.asarray(images), np.asarray(maps)
    if len(images) != len(maps):
        raise ValueError(f"saliency_grid: {len(images)} images but {len(maps)} maps")
    titles = list(titles) if titles is not None else [None] * len(images)
    num_rows = max(1, -(-len(images) // num_columns))
    fig, axes = _image_grid(num_rows, num_columns, cell_size=1.5)
    for ax, image, saliency_map, caption in zip(axes.flat, images, maps, titles):
        _overlay(ax, image, saliency_map, cmap, alpha)
        if caption:
            ax.set_title(caption, fontsize=7)
    for ax in list(axes.flat)[len(images):]:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def mean_saliency_maps(maps_by_model, class_names=EMOTIONS, background=None, cmap="inferno",
                       alpha=0.6, title="Mean saliency per class"):
    """Per-class mean saliency maps: one row per model, one column per class.

    Parameters
    ----------
    maps_by_model : dict of str -> numpy.ndarray, shape (C, 48, 48)
        From ``ferlib.explain.mean_maps_by_class``; a NaN map (no images) is left blank.
    class_names : sequence of str
    background : numpy.ndarray, optional
        A (48, 48) face (e.g. the mean test image) drawn under the maps.
    cmap : str
    alpha : float
        Opacity of the maps over ``background``.
    title : str

    Returns
    -------
    matplotlib.figure.Figure
        Each map scaled to its own maximum, so the panels show where, not how much.
    """
    if not maps_by_model:
        raise ValueError("maps_by_model: no model to draw")
    fig, axes = _image_grid(len(maps_by_model), len(class_names), cell_size=1.5)
    for row, (model, maps) in enumerate(maps_by_model.items()):
        maps = np.asarray(maps, dtype=float)
        if maps.shape[0] != len(class_names):
            raise ValueError(f"maps_by_model[{model!r}]: {maps.shape[0]} maps for "
                             f"{len(class_names)} classes")
        for column, saliency_map in enumerate(maps):
            ax = axes[row, column]
            if not np.isfinite(saliency_map).any():
                ax.text(0.5, 0.5, "no images", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
            elif background is not None:
                _overlay(ax, background, saliency_map, cmap, alpha)
            else:
                ax.imshow(saliency_map, cmap=cmap, vmin=0,
                          vmax=max(float(np.nanmax(saliency_map)), 1e-12))
            if row == 0:
                ax.set_title(class_names[column], fontsize=9)
        axes[row, 0].set_ylabel(_display_name(model), fontsize=9)
    fig.suptitle(title)
    return fig
