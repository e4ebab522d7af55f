"""The serving benchmark behind `fastgen bench serve`.

workload.py (requests and presets), runner.py (targets and loads), trace.py (what a run records),
metrics.py (what is computed from it), serving.py (the scheduler x load matrix), report.py (the
table).
"""
