"""The benchmark scripts import their neighbours by plain name (they run as `python benchmarks/x.py`), so the tests
import them the same way, from benchmarks/ on the path."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
