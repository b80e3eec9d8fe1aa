"""One module per experiment: its work items, its steps and its headline numbers."""
