"""The steps `training.train.train` runs, in order, one module each.

data (read the TFRecords) → split (duplicate-aware train/val/test) → fit
(cross-validate the recipe, then its stages) → measure (test logits and
metrics, validation logits) → calibrate (temperature) → threshold (review
flag) → save (companion files, metadata, artifact) → verify (reload as
scoring does) → save.publish (copy to gs://).

Steps log; they never print: the CLI prints what a person reads.
"""
