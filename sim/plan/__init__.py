"""`python -m sim.plan`: planning a federation at deployment scale, in virtual time, from a calibration.

Modules: ``config`` (plan scenarios, validated), ``calibration`` (what a real run measured),
``population`` (schools and users), ``flows`` (the fluid transfer engine on sim.network's rules),
``rollout`` (star and relay), ``serving`` (requests and node queues), ``planner`` (the whole plan),
``report`` (report.json, report.md, plots), ``validate`` (a real run predicted), ``cli``.
"""
