"""The benchmark behind `nanoswarm bench`: local vs swarm speed, overhead, bytes, batching."""

from .models import SHAPES, make_random_model_dir
from .options import BenchOptions, check_options, parse_ints, parse_names
from .report import format_report, targets
from .runner import run_bench

__all__ = ["SHAPES", "BenchOptions", "check_options", "format_report", "make_random_model_dir", "parse_ints",
           "parse_names", "run_bench", "targets"]
