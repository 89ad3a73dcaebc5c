"""Sweeps: a grid of runs from one recipe. `grid` reads and checks the grid, `record` keeps
SWEEP_DIR/sweep.json, `start` creates the members and runs them (one SLURM job array, or one
after another here) and resumes them, `status` reads every member's state."""
