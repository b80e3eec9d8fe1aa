"""The notebook chain, the run store, the runner, prepare items and the HTML reports."""
