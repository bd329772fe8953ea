"""Classical baselines (issues 4/7 and 5/7)."""
