"""Data, from raw files to batches: the canonical case (:mod:`.case`), readers per source
format (:mod:`.readers`), the demo (:mod:`.demo`), preprocessing and its inverse
(:mod:`.preprocess`), preparing a store (:mod:`.prepare`, :mod:`.store`), splits
(:mod:`.splits`), datasets and samplers (:mod:`.datasets`), augmentation (:mod:`.transforms`),
mask-channel checks (:mod:`.channels`) and the DataModule (:mod:`.datamodule`).

May import only ``tumorseg.core``.
"""
