"""Server side of fedprune: strategies, aggregation, planning and the simulator."""
