"""tests/dist: multi-process checks on gloo. Ranks are forked by `spawn.run_ranks` from the pytest process."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # `from spawn import run_ranks`
os.environ.setdefault("OMP_NUM_THREADS", "1")
