"""Device side of fedprune, and what both sides share: model specs, plans, the update codec.

Kept free of coordinator imports so it installs lean on a device.
"""
