"""Every figure of the study (each function returns a matplotlib Figure; no pyplot)."""
