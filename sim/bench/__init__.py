"""`python -m sim.bench`: performance as ratios against baselines measured in the same run.

``runner`` holds the registry and the command line, ``core`` what every benchmark shares (result,
sizes, interleaved timing), ``wire`` the bundle decode and shipping benchmarks, ``federation`` those
that need a running federation (start-up, memory, scoring, mixtures).
"""
