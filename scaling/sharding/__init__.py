"""Meshes, logical-axis rules and layouts."""
