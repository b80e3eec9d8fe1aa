"""Models, training, network outputs, masks from outputs, caches and gates: images to instance masks."""
