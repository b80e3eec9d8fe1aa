"""Params files validated against their schemas, and the settings objects made from them."""
