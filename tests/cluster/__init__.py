"""Cluster paths against a real SLURM cluster (sbatch + srun, Hydra's submitit launcher, requeues).

Skipped where ``sinfo`` does not answer; ``.ci/run`` starts a one-machine cluster first.
"""
