"""SLURM: one job of N nodes x G tasks, submitted through submitit.

    request.py     what the job asks for (the recipe's `slurm` section with the command line's options)
    executor.py    the submitit executor of that request, and submitting it
    submit.py      `flsl pretrain/resume --nodes` from Python: checks, run dir, one `submitit.Job`
    batch.py       in the job, the batch step: starts the tasks with srun, passes stop signals on
    job.py         in the job, every task: rendezvous, training, and what a stop does to the job
    rendezvous.py  where the tasks meet, from `submitit.JobEnvironment`
    queries.py     questions to SLURM (scontrol, squeue, sinfo), and the one list of job states
    errors.py      the error of everything that talks to SLURM

The Python entry point is `flsl_cli.launch.slurm.submit.submit_pretrain`. Nothing here is
imported by `flsl --help`; nothing imports torch at module level.
"""
