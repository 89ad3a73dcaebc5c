"""Starting runs: the checks before any process starts, then the processes themselves (this
one, several local ones, or a SLURM job) for `flsl pretrain`, `flsl resume` and `flsl knn-eval`;
the in-job entry point of SLURM tasks; `flsl status`."""
