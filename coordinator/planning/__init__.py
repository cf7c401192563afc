"""Sizing devices: the memory model, the planner, and verification by rehearsal."""
