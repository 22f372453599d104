"""A stand-in sector model for the demo DAG: burns CPU for a while, reports a number.

python3 model.py SECTOR YEAR SECONDS
"""

import json
import math
import os
import sys
import time

sector, year, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.perf_counter()
total, n = 0.0, 0
while time.perf_counter() - start < seconds:
    for i in range(10_000):
        total += math.sqrt(i + n)
    n += 10_000
result = {"sector": sector, "year": year, "iterations": n, "value": round(total % 1000, 3)}
print(f"{sector} {year}: {n:,} iterations in {time.perf_counter() - start:.2f} s")
if "SMIFDB_RESULT_FILE" in os.environ:
    with open(os.environ["SMIFDB_RESULT_FILE"], "w") as f:
        json.dump(result, f)
