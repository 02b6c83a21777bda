"""Input: sources, file lists, bad-file skipping and the Grain chains (host-local numpy only).

  sources     random-access sources (folder, TFDS, samples, synthetic) and `make_source`
  file_lists  directory scans, globs and manifests, cached in the workdir
  sampler     the global example order, each process's rows of it, the checkpointed position
  skipping    unreadable files replaced by layout-independent substitutes, counted; when to stop
  pipeline    the train, eval and encode chains
"""
