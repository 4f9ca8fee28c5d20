"""Complexity accounting: parameters, FLOPs, the paper's FLOPs convention, latency and peak memory.

FLOPs are counted by two independent counters (fvcore, torch.utils.flop_counter) with a cross-check,
and by the paper's (DeepSpeed's) convention.

`deconver complexity` (cli.py) writes one record per (dataset, model); conventions in docs/complexity.md.
"""
from deconver.complexity.analytic import deconver_costs, paper_costs
from deconver.complexity.counters import (count_parameters, cross_check, flop_counter_count, fvcore_count,
                                          register_python_op)
from deconver.complexity.paper import paper_count, register_opaque
from deconver.complexity.record import measure
from deconver.complexity.runtime import TensorMemoryTracker, measure_runtime

__all__ = ["count_parameters", "fvcore_count", "flop_counter_count", "cross_check", "register_python_op",
           "paper_count", "register_opaque", "deconver_costs", "paper_costs", "measure", "measure_runtime",
           "TensorMemoryTracker"]
