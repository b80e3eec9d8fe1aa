"""Raw images to manifests and training sets: tile discovery, donor splits, audit, the simulated cohort, DSB2018."""
