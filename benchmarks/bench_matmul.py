"""Benchmark ``matmul_peak``: this machine's fp32 matrix-product rate, the yardstick for training.

Measured with the Keras backend in use (``keras.ops.matmul``) and with numpy, on square float32
matrices; the best of several products counts (the peak, not the typical rate).

Run by ``run_all.py`` (``--only matmul_peak``, or with ``train``, which needs the peak); it
has no command line of its own.
"""

from __future__ import annotations

import common

NAME = "matmul_peak"
MATRIX_SIZE = 2048
REPEATS = 10
QUICK_REPEATS = 3


def _keras_product(a, b):
    import keras

    a, b = keras.ops.convert_to_tensor(a), keras.ops.convert_to_tensor(b)
    # Reading one element back waits for the product on asynchronous backends (JAX, GPUs).
    return lambda: keras.ops.convert_to_numpy(keras.ops.matmul(a, b)[0, 0])


def _numpy_product(a, b):
    return lambda: a @ b


def run(quick: bool = False, context: dict | None = None) -> dict:
    import keras
    import numpy as np

    repeats = QUICK_REPEATS if quick else REPEATS
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((MATRIX_SIZE, MATRIX_SIZE), dtype=np.float32) for _ in "ab")
    flops = 2 * MATRIX_SIZE**3
    rates = {}
    for library, make in (("keras", _keras_product), ("numpy", _numpy_product)):
        product = make(a, b)
        product()  # warm-up: thread pools, kernel selection
        rates[library] = flops / min(common.call_times(product, repeats)) / 1e9
    return {
        "settings": {"matrix_size": MATRIX_SIZE, "dtype": "float32", "repeats": repeats,
                     "statistic": "best of repeats",
                     "keras_backend": keras.backend.backend()},
        "keras_gflops": rates["keras"],
        "numpy_gflops": rates["numpy"],
        # The training benchmark compares against the backend's own rate.
        "peak_gflops": rates["keras"],
    }


def print_section(section: dict) -> None:
    size = section["settings"]["matrix_size"]
    common.print_table(
        f"matmul_peak: {size}x{size} float32, best of {section['settings']['repeats']}",
        ["library", "GFLOP/s"],
        [[f"keras.ops.matmul ({section['settings']['keras_backend']})",
          section["keras_gflops"]],
         ["numpy", section["numpy_gflops"]]])
