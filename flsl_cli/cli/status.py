"""`flsl status RUN_DIR`: job id(s), state, step reached, newest checkpoint, requeues, last error."""

from __future__ import annotations

from typing import Annotated

import typer

from flsl_cli.cli.render import handle_errors, out_console


@handle_errors
def status(
    run_dir: Annotated[
        str,
        typer.Argument(help="Run directory written by `flsl pretrain`: a path or a URL such as s3://bucket/runs/x."),
    ],
    *,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON (for scripts).")] = False,
) -> None:
    """Where a run stands: state, step, newest checkpoint, SLURM jobs and requeues, last error
    (for a sweep dir: one line per member)."""
    from flsl_cli.cli.sweep import is_sweep, show_sweep_status

    if is_sweep(run_dir):
        return show_sweep_status(run_dir, as_json=as_json)
    from flsl_cli.launch.status import read_status

    result = read_status(run_dir)
    if as_json:
        typer.echo(result.to_json())
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"flsl status: {run_dir}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")

    def add(name: str, value: str) -> None:  # values are shown as they are, never as markup
        table.add_row(name, Text(value))

    add("state", result.status)
    step = "none yet" if result.step is None else f"{result.step}"
    if result.epoch is not None:
        step += f" (epoch {result.epoch}" + (f"/{result.epochs})" if result.epochs else ")")
    add("step", step)
    if result.newest_checkpoint:
        newest = result.newest_checkpoint
        age = f", {_ago(newest['age_s'])}" if newest.get("age_s") is not None else ""
        add("newest checkpoint", f"step {newest['step']}: {newest['path']}{age} ({result.checkpoints} kept)")
    else:
        add("newest checkpoint", "none yet")
    if result.stopped:
        add("last stop", f"{result.stopped['signal']} after step {result.stopped['step']}")
    if result.scheduler == "slurm" or result.job_ids:
        jobs = []
        for job_id in result.job_ids:
            info = result.jobs.get(job_id, {})
            detail = info.get("state", "")
            if detail == "UNKNOWN_TO_SLURM":
                detail = "no longer known to SLURM"
            if info.get("reason") and info.get("state", "").startswith("PENDING"):
                detail += f", {info['reason']}"
            if info.get("elapsed") and info.get("state", "") in ("RUNNING", "COMPLETING"):
                detail += f", {info['elapsed']} of {info.get('time_limit', '?')}"
            if result.job_nodes.get(job_id):
                detail += f"{', ' if detail else ''}nodes {result.job_nodes[job_id]}"
            jobs.append(f"{job_id} ({detail})" if detail else job_id)
        answered = "" if result.slurm_answered else "  (squeue/sacct did not answer: state from the run dir)"
        add("SLURM jobs", (", ".join(jobs) or "none") + answered)
        if result.nodes:
            add("nodes", result.nodes)
        per_job = ", ".join(f"job {job}: {count}" for job, count in result.job_requeues.items())
        add("requeues", f"{result.requeues}" + (f" ({per_job})" if per_job else ""))
    if result.last_error:
        error = result.last_error
        node = f" on node {error['node']}" if error.get("node") else ""
        where = f"job {error['job_id']}, rank {error.get('rank', '?')}{node}: " if error.get("job_id") else ""
        add("last error", f"{where}{error.get('message', '')}")
    if result.leftovers:
        add(
            "leftovers",
            "\n".join(result.leftovers) + "\n(temporary files of writes that were cut off; `flsl resume` removes them)",
        )
    if result.logs:
        add("logs", "\n".join(result.logs))
    out_console.print(table)


def _ago(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds / 3600:.1f} h ago"
