"""Performance benchmark (``clinfusediff benchmark``, ``python training/benchmark.py``).

Split by what it measures; ``run.run_benchmark`` runs them all in one process and prints one table:

* ``tools``          measuring tools: machine/load info, peak memory, interleaved timing;
* ``context``        the shared setup: a trained diffusion checkpoint, its cohort, the encoded
                     test patients (``BenchContext``);
* ``predict``        per-patient prediction, inference + TTT: TTT overhead, K samples vs 1,
                     batched TTT (rows 1, 2, 4);
* ``sampling``       diffusion sampling: DDIM few steps vs DDPM all steps (row 3) and the cost
                     of sampling itself: K = 8 vs K = 1, 32 episodes batched vs one by one,
                     diffusion vs attention per episode on a tabular-only model;
* ``preprocess``     preprocessing vs plain SimpleITK, cache hit vs raw (row 5; also standalone:
                     ``python training/benchmark_preprocess.py``);
* ``training_speed`` training samples/s, peak memory, matmul rate and the encoders' share
                     (rows 6, 7);
* ``model_step``     standalone: one training step and one prediction per fusion type on random
                     inputs (``python training/benchmark_model_step.py``);
* ``ttt_cost``       standalone: sampling and batched TTT cost per episode at a config's model
                     size, random weights (``python training/benchmark_ttt.py``);
* ``run``            ``run_benchmark`` and the table (``TARGETS``, ``format_table``).
"""

from .run import GPU_ONLY, NO_GPU, TARGETS, format_table, run_benchmark
from .sampling import condition_rows
from .tools import PeakRSS, interleaved, load_average, machine_info, timed

__all__ = ["GPU_ONLY", "NO_GPU", "TARGETS", "PeakRSS", "condition_rows", "format_table",
           "interleaved", "load_average", "machine_info", "run_benchmark", "timed"]
