"""What the SLURM tests share: whether a SLURM answers here, and which jobs it runs.

The tests never start SLURM themselves (that needs root and package installs);
``ci/slurm.sh`` does, and CI runs it first. Without it they skip, saying why.
"""
from __future__ import annotations

import functools
import shutil
import subprocess

HOW_TO_START = "start a single-node SLURM with ci/slurm.sh (as root)"


@functools.lru_cache(maxsize=None)
def slurm_problem() -> str | None:
    """Why SLURM cannot run the tests' jobs here, or None when it can (asked once per
    session: sinfo takes seconds to give up on a controller that is down)."""
    for command in ("sbatch", "squeue", "sinfo", "scancel"):
        if shutil.which(command) is None:
            return f"SLURM is not installed ({command} not found); {HOW_TO_START}"
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed (pip install -e '.[test]')"
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True,
                              text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 20 s; {HOW_TO_START}"
    states = done.stdout.split()
    if done.returncode != 0 or not states:
        return (f"no SLURM controller answers (sinfo: "
                f"{(done.stderr or done.stdout).strip() or done.returncode}); {HOW_TO_START}")
    if not any(s.rstrip("*~#!%$@^-").startswith(("idle", "mix", "alloc", "comp"))
               for s in states):
        return f"no SLURM node can run jobs (node states: {', '.join(states)})"
    return None


def squeue_jobs(job_ids=None) -> list[str]:
    """Job ids SLURM still lists (pending, running or completing), of ``job_ids`` only
    if given."""
    done = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True,
                          timeout=20, check=True)
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    if job_ids is not None:
        wanted = {str(j) for j in job_ids}
        listed = [j for j in listed if j in wanted]
    return listed
