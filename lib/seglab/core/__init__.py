"""Foundations every stage uses: atomic writes and hashes (io), where things live (paths)."""
