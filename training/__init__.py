"""Training pipeline: teacher, pseudo-labels, student."""
