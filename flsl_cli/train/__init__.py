"""Training: schedules, optimizer, the step, the loop, metrics and progress."""
