"""Evaluation: identity, pose, expression, temporal and background metrics of a swap."""
