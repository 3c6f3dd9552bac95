"""Benchmark ``train``: training images/s per quick-profile model, and what the stem costs.

Each model is built and compiled as ``ferlib.train`` builds it for the quick profile and fitted
on random uint8 images. The same network without its stem (rescale,
augmentation, resize, gray to RGB: every layer before the first one with weights) is fitted on
random float32 RGB images in the same run, so the stem and augmentation overhead is a ratio of
two figures measured side by side. The training FLOP rate (3 x the forward FLOPs per image x
images/s) is given as a fraction of the machine's fp32 matmul peak.

Its :func:`fit_images_per_second` (the timing) and :func:`without_stem` are shared with the
other training benchmarks. Run by ``run_all.py`` (``--only train``, which also runs
``matmul_peak``); it has no command line of its own.
"""

from __future__ import annotations

import time

import common

NAME = "train"
TIMED_BATCHES, QUICK_TIMED_BATCHES = 20, 3
WARMUP_BATCHES = 2  # the timer needs two batches
REPEATS, QUICK_REPEATS = 3, 1
STEM_OVERHEAD_LIMIT_PERCENT = 15.0
# Backward pass ~ 2 x forward: the usual estimate of training FLOPs per image.
TRAINING_FLOPS_PER_FORWARD = 3


def without_stem(model):
    """``model`` from its first layer with weights on, re-wired to a float32 input.

    ferlib's stem layers have no weights and every registered model is a chain of layers
    after its stem (residual connections live inside the backbone layer), which is checked.

    Returns
    -------
    (keras.Model, list of str)
        The bare model (it shares its layers with ``model``) and the stem's layer names.
    """
    import keras

    layers = model.layers[1:]  # after the InputLayer
    first = next(index for index, layer in enumerate(layers) if layer.weights)
    stem, tail = layers[:first], layers[first:]
    for previous, layer in zip(tail, tail[1:]):
        parents = [node.operation for node in layer._inbound_nodes[0].parent_nodes]
        if len(layer._inbound_nodes) != 1 or parents != [previous]:
            raise ValueError(f"{model.name}: layer {layer.name!r} does not follow "
                             f"{previous.name!r} alone; cannot strip the stem of a non-chain")
    inputs = keras.Input(shape=tail[0].input.shape[1:], dtype="float32", name="bare_image")
    outputs = inputs
    for layer in tail:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs, name=f"{model.name}_bare"), [l.name for l in stem]


def fit_images_per_second(model, images, targets, batch_size: int) -> float:
    """Images/s of one ``model.fit`` epoch over in-memory arrays, as ``ferlib.train`` fits,
    or over a dataset of ``(images, targets)`` batches of ``batch_size`` passed as ``images``
    with ``targets=None`` (``bench_pipeline``'s ``tf.data`` feed).

    Timed from the end of the first batch to the end of the last, so fit's set-up and the
    input pipeline's start (a fixed cost that a real epoch of 449 batches amortises) do not
    weigh on short timed fits.
    """
    import keras

    class BatchTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.batch_ends = []

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # waits for the step on asynchronous backends
            self.batch_ends.append(time.perf_counter())

    timer = BatchTimer()
    if targets is None:  # a dataset batches and shuffles itself (fit would warn otherwise)
        model.fit(images, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
    else:
        model.fit(images, targets, batch_size=batch_size, epochs=1, shuffle=True, verbose=0,
                  callbacks=[timer])
    ends = timer.batch_ends
    if len(ends) < 2:
        raise ValueError(f"timing needs at least 2 batches, got {len(ends)}")
    return batch_size * (len(ends) - 1) / (ends[-1] - ends[0])


def measure_model(model_name: str, quick: bool, peak_gflops: float | None) -> dict:
    import keras

    from ferlib.models import count_flops
    from ferlib.train import compile_model, build_for_settings

    keras.backend.clear_session()
    full, settings = common.build_quick_model(model_name)
    # A second, independent copy to strip, so the two fits share no weights or optimizer.
    bare, stem_layers = without_stem(build_for_settings(settings))
    compile_model(bare, settings)

    batch_size = settings["train"]["batch_size"]
    count = batch_size * (QUICK_TIMED_BATCHES if quick else TIMED_BATCHES)
    warmup = batch_size * WARMUP_BATCHES
    images, targets = common.random_training_data(count)
    inputs = {"full": images, "bare": common.random_images(
        count, channels=bare.input_shape[-1], dtype="float32")}
    models = {"full": full, "bare": bare}

    for variant, model in models.items():  # builds the train functions
        fit_images_per_second(model, inputs[variant][:warmup], targets[:warmup], batch_size)
    rates = {variant: [] for variant in models}
    for _ in range(QUICK_REPEATS if quick else REPEATS):
        for variant, model in models.items():  # interleaved, so drifting load hits both
            rates[variant].append(fit_images_per_second(model, inputs[variant], targets,
                                                        batch_size))
    full_rate, bare_rate = max(rates["full"]), max(rates["bare"])

    forward_flops = count_flops(full)
    training_gflops = (TRAINING_FLOPS_PER_FORWARD * forward_flops * full_rate / 1e9
                       if forward_flops else None)
    return {
        "parameters": int(full.count_params()),
        "stem_layers": stem_layers,
        "images_per_second": full_rate,
        "bare_images_per_second": bare_rate,
        "all_images_per_second": rates,
        "stem_overhead_percent": 100.0 * (1.0 - full_rate / bare_rate),
        "forward_gflops_per_image": forward_flops / 1e9 if forward_flops else None,
        "training_gflops_per_second": training_gflops,
        "fraction_of_matmul_peak": (training_gflops / peak_gflops
                                    if training_gflops and peak_gflops else None),
        "settings": {"batch_size": batch_size, "timed_images": count,
                     "warmup_images": warmup, "augment": settings["augment"],
                     "model_params": settings["model_params"],
                     "precision": settings["train"]["precision"],
                     "jit_compile": settings["train"]["jit_compile"]},
    }


def measure_precision(model_name: str, quick: bool) -> dict:
    """Training images/s of one model in float32 and in mixed_bfloat16, interleaved."""
    import keras

    models = {}
    for precision in ("float32", "mixed_bfloat16"):
        models[precision], settings = common.build_quick_model(model_name, precision)
    keras.mixed_precision.set_global_policy("float32")
    batch_size = settings["train"]["batch_size"]
    count = batch_size * (QUICK_TIMED_BATCHES if quick else TIMED_BATCHES)
    images, targets = common.random_training_data(count, label_seed=2)
    warmup = batch_size * WARMUP_BATCHES
    rates = {precision: [] for precision in models}
    for precision, model in models.items():
        fit_images_per_second(model, images[:warmup], targets[:warmup], batch_size)
    for _ in range(QUICK_REPEATS if quick else REPEATS):
        for precision, model in models.items():
            rates[precision].append(fit_images_per_second(model, images, targets, batch_size))
    best = {precision: max(values) for precision, values in rates.items()}
    return {"model": model_name, "images_per_second": best, "all_images_per_second": rates,
            "bf16_speedup": best["mixed_bfloat16"] / best["float32"]}


def run(quick: bool = False, context: dict | None = None) -> dict:
    """Measure every registered model; ``context['matmul_peak']`` supplies the peak GFLOP/s."""
    peak = ((context or {}).get("matmul_peak") or {}).get("peak_gflops")
    models = {name: measure_model(name, quick, peak) for name in common.model_names()}
    # Issue: does mixed_bfloat16 pay off for the ViT (mostly matrix products) on this CPU?
    precision = measure_precision("vit", quick)
    return {
        "vit_precision": precision,
        "settings": {"profile": common.PROFILE, "data": "random uint8 (N, 48, 48, 1); bare: "
                     "random float32 (N, 48, 48, 3)",
                     "statistic": f"best of {QUICK_REPEATS if quick else REPEATS} timed fits "
                                  f"(one epoch each, timed from its first batch's end, after a "
                                  f"warm-up fit)",
                     "training_flops": f"{TRAINING_FLOPS_PER_FORWARD} x forward FLOPs "
                                       f"(ferlib.models.count_flops) per image",
                     "matmul_peak_gflops": peak},
        "models": models,
        "checks": {f"{name}_stem_overhead_percent": common.check(
            result["stem_overhead_percent"], STEM_OVERHEAD_LIMIT_PERCENT, "%")
            for name, result in models.items()},
    }


def print_section(section: dict) -> None:
    rows = []
    for name, result in section["models"].items():
        fraction = result["fraction_of_matmul_peak"]
        rows.append([name, result["images_per_second"], result["bare_images_per_second"],
                     result["stem_overhead_percent"], result["forward_gflops_per_image"],
                     result["training_gflops_per_second"],
                     None if fraction is None else 100 * fraction,
                     common.verdict(section["checks"][f"{name}_stem_overhead_percent"])])
    batch_size = next(iter(section["models"].values()))["settings"]["batch_size"]
    common.print_table(
        f"train: quick-profile models, batch {batch_size}, {section['settings']['statistic']}",
        ["model", "img/s", "bare img/s", "stem %", "fwd GFLOP/img", "train GFLOP/s",
         "% of peak", "stem target"], rows)
    precision = section.get("vit_precision")
    if precision:
        rates = precision["images_per_second"]
        print(f"ViT training img/s: float32 {rates['float32']:.1f}, mixed_bfloat16 "
              f"{rates['mixed_bfloat16']:.1f} (x{precision['bf16_speedup']:.2f})")
