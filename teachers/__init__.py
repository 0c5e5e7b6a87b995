"""Teachers: score the student's own samples with dense token log-probs, each in its own view of the sample."""
