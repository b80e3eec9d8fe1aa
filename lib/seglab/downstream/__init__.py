"""Tile counts to donor features to clinical correlations, FDR and bootstrap stability."""
