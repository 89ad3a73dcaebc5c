"""The process environment as flsl reads it: which process of a run this is, with one
local-rank rule whichever launcher set the variables."""

from __future__ import annotations

from flsl_cli.distributed.env import ProcessEnv, read_env, slurm_task

SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "13",
    "SLURM_LOCALID": "5",
    "SLURMD_NODENAME": "gpu08",
    "SLURM_RESTART_COUNT": "2",
}


def test_one_process_without_launcher_variables():
    assert read_env({}) == ProcessEnv(rank=0, local_rank=0, world_size=1)
    assert slurm_task({}) is None


def test_launcher_variables_come_first():
    """torchrun / `flsl --devices` / flsl's SLURM tasks set RANK, LOCAL_RANK, WORLD_SIZE: those decide."""
    env = {**SLURM, "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    assert read_env(env) == ProcessEnv(rank=3, local_rank=1, world_size=4)


def test_slurm_variables_and_the_one_local_rank_rule():
    """A SLURM task's local rank is SLURM_LOCALID, except that a task bound to one GPU uses device 0,
    whether flsl reads SLURM's variables directly or derives the launcher variables from them."""
    from flsl_cli.launch.slurm.rendezvous import torch_env

    assert read_env(SLURM) == ProcessEnv(rank=13, local_rank=5, world_size=16)
    bound = {**SLURM, "CUDA_VISIBLE_DEVICES": "5"}
    assert read_env(bound).local_rank == 0
    assert torch_env(bound)["LOCAL_RANK"] == "0" and torch_env(SLURM)["LOCAL_RANK"] == "5"
    task = slurm_task(SLURM)
    assert (task.job_id, task.restart, task.node, task.nodelist) == ("4242", 2, "gpu08", "gpu[07-08]")
