"""Building blocks shared by both detectors: attention, deformable attention, boxes, position encodings."""
