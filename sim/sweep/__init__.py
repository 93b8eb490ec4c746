"""Scenario sweeps: one command runs a grid of federation runs and puts them on one bytes-against-quality
frontier.

Modules by job: ``grid`` (the [sweep] table and --grid, expanded into checked scenarios), ``runner`` (each
point a real ``sim.run`` federation run, models and Ray shared), ``rows`` (a row per point from its own
report.json; the Pareto frontiers), ``report`` (sweep.json, sweep.md, plots) and ``cli`` (the command).
"""
