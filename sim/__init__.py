"""What users run: sim.run, scenarios, the network model, the bets, reports and benchmarks.

Dependency rule: sits on top and may import every other package.
"""

from .console import quiet_grpc_env

quiet_grpc_env()  # before any module of sim imports grpc: gRPC reads its settings once, as it loads
