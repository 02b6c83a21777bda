"""Input: sources, file lists, bad-file skipping and the Grain chains (host-local numpy only).

  sources     random-access sources (folder, TFDS, samples, synthetic) and `make_source`
  file_lists  directory scans, globs and manifests, cached in the workdir
  sampler     the global example order, each process's rows of it, the checkpointed position
  skipping    unreadable files replaced by layout-independent substitutes, counted; when to stop
  pipeline    the train, eval and encode chains

Packing a collection into a TFDS dataset (`vae_scale.prepare`):
  image_collections  folders, manifests, webdataset tars -> work units -> items (bytes, key, caption)
  packing            the per-image work (decode once, shrink, JPEG or original bytes); dedup; splits
  pack_report        the counts of a prepare (prepare_report.json)
  staging            the local prepare's committed units (what a rerun skips); the kept examples
  packed_dataset     TFDS's writer (AdhocBuilder, ArrayRecord), commit points, publishing to gs://
  packed_beam        the same packing as an Apache Beam pipeline
"""
