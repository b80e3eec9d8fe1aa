"""Submitting the notebook chain, prepare arrays and inference shards to Slurm, and their status.

Slurm is the engine; this package only writes job scripts and calls Slurm's commands. One job
per module, in the order a submission goes through them:

- :mod:`~seglab.slurm.cluster`: ``slurm/cluster.yaml`` (resources, environment, array grids).
- :mod:`~seglab.slurm.plan`: what to submit and which job waits on which (``afterok``);
  prepare arrays; sharded inference (``plan_predict``).
- :mod:`~seglab.slurm.script`: one job's sbatch script from the template ``slurm/job.sbatch``.
- :mod:`~seglab.slurm.submit`: render and ``sbatch`` a plan into a submission folder.
- :mod:`~seglab.slurm.submissions`: the submission records under ``runs/_slurm/``.
- :mod:`~seglab.slurm.status`: a submission's jobs joined with their runs; cancelling dependants.
- :mod:`~seglab.slurm.commands`: ``sbatch``, ``squeue``, ``sacct``, ``scancel`` and their output.

The merge step of sharded inference never touches Slurm: :mod:`seglab.segment.shards`.
"""
