"""Submitting the notebook chain, prepare arrays and inference shards to Slurm, and their status."""
