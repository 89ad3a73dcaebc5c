"""Starting training processes: in this process, several local processes, or a SLURM job."""
