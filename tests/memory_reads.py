"""Run a script with psutil reading, in each process, the free memory that $FREE_MEMORY_BY_RANK gives for its rank
(comma-separated bytes): as on nodes whose processes read different amounts at the same moment.

    python tests/memory_reads.py train.py --name=value ...
"""
import os
import runpy
import sys

import psutil

readings = [int(value) for value in os.environ["FREE_MEMORY_BY_RANK"].split(",")]
read = psutil.virtual_memory


def virtual_memory():
    return read()._replace(available=readings[int(os.environ.get("RANK", "0"))])


psutil.virtual_memory = virtual_memory
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
