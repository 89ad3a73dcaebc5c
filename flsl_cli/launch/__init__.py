"""Starting training processes: in this process, several local processes, or (later) SLURM."""
