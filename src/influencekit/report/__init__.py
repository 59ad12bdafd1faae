"""Figures and reports built from influence scores."""
