"""Sweeps: a YAML of axes -> trials (spec), where each stands (state), and launchers (local, SLURM)."""
