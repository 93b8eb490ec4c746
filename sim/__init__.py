"""What users run: sim.run, scenarios, the network model, the bets, reports and benchmarks.

Dependency rule: sits on top and may import every other package.
"""
