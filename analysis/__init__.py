"""Load run records, fit scaling laws, plot and report."""
