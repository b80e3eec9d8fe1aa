"""Matching predicted instances to true ones: metrics and the evaluation tables built on them."""
