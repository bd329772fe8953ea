"""The model zoo: one module per family, a registry by name, shared blocks."""
