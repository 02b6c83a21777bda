"""The same packing as an Apache Beam pipeline, for collections one machine is too slow for.

TFDS builds large datasets on Beam (DirectRunner locally; Flink, Spark or Dataflow at scale): here
the builder's `_split_generators` takes TFDS's pipeline (TFDS passes it to a `pipeline` argument)
and lays out, once for both splits: units -> `packing.pack_unit` -> the first record of each
content hash (the smallest global ordinal, as the local path keeps the first in order) -> the
held-out draw (`packing.EvalDraw`, with the smallest kept hash as a side input) -> each split's
(key, example)s, which TFDS's BeamWriter shuffles by key hash and writes exactly as its local
writer does. So the examples and their order are the local path's. The report is combined in the
same pipeline and written into TFDS's incomplete version folder before TFDS commits it.

Beam runners retry failed work themselves; an interrupted Beam prepare starts over (the local
path's per-unit staging is what resumes).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import apache_beam as beam
from etils import epath

from vae_scale.data import image_collections
from vae_scale.data import pack_report
from vae_scale.data import packed_dataset
from vae_scale.data import packing


def pipeline_options(text: str) -> beam.options.pipeline_options.PipelineOptions:
  """'runner=DirectRunner,direct_num_workers=2' (TFDS's --beam_pipeline_options) as options."""
  flags = [f"--{option.strip()}" for option in text.split(",") if option.strip()]
  return beam.options.pipeline_options.PipelineOptions(flags)


class _FirstOf(beam.CombineFn):
  """The record with the smallest ordinal (`packing.Dedup.first_of`)."""

  def create_accumulator(self):
    return None

  def add_input(self, best, record):
    return record if best is None or record.ordinal < best.ordinal else best

  def merge_accumulators(self, accumulators):
    best = None
    for record in accumulators:
      best = self.add_input(best, record) if record is not None else best
    return best

  def extract_output(self, best):
    return best


class _MinOrNone(beam.CombineFn):
  """min() of ints; None for an empty collection."""

  def create_accumulator(self):
    return None

  def add_input(self, low, value):
    return value if low is None else min(low, value)

  def merge_accumulators(self, accumulators):
    values = [a for a in accumulators if a is not None]
    return min(values) if values else None

  def extract_output(self, low):
    return low


class _ReportFn(beam.CombineFn):
  """`pack_report.Report` over ('record', record) and ('kept', (split, record)) events."""

  def __init__(self, first_n: int):
    super().__init__()
    self._first_n = first_n

  def create_accumulator(self):
    return pack_report.Report(self._first_n)

  def add_input(self, report, event):
    kind, value = event
    if kind == "record":
      report.add_record(value)
    else:
      report.add_kept(value[1], value[0])
    return report

  def merge_accumulators(self, accumulators):
    accumulators = iter(accumulators)
    merged = next(accumulators)
    for other in accumulators:
      merged.merge(other)
    return merged

  def extract_output(self, report):
    return report


class BeamPackedImages(packed_dataset.PackedImages, skip_registration=True):
  """PackedImages whose splits are one Beam graph over the collection's units."""

  def __init__(self, *, units: Sequence[image_collections.Unit], options: packing.PackOptions,
               eval_fraction: float, seed: int, keep_duplicates: bool,
               report_fields: dict[str, Any], first_n: int, **kwargs: Any):
    self._units, self._options = list(units), options
    self._eval_fraction, self._seed = eval_fraction, seed
    self._keep_duplicates, self._first_n = keep_duplicates, first_n
    self._report_fields = report_fields
    super().__init__(report=None, **kwargs)

  def _split_generators(self, dl_manager, pipeline):  # pylint: disable=arguments-differ
    del dl_manager
    options, seed, fraction = self._options, self._seed, self._eval_fraction
    records = (pipeline
               | "Units" >> beam.Create(self._units)
               | "Spread" >> beam.Reshuffle()
               | "Pack" >> beam.FlatMap(packing.pack_unit, options=options))
    usable = records | "Usable" >> beam.Filter(lambda r: not r.reason)
    if self._keep_duplicates:
      kept = usable
    else:
      kept = (usable
              | "ByContent" >> beam.Map(lambda r: (r.sha256, r))
              | "FirstOfContent" >> beam.CombinePerKey(_FirstOf())
              | "Kept" >> beam.Values())
    min_hash = (kept
                | "EvalHash" >> beam.Map(lambda r: packing.eval_hash(r.key, seed))
                | "MinHash" >> beam.CombineGlobally(_MinOrNone()))
    with_split = kept | "Draw" >> beam.Map(
        lambda r, low: (packing.EvalDraw(fraction, seed, low).split_of(r), r),
        low=beam.pvalue.AsSingleton(min_hash))
    splits = [packing.TRAIN]
    if fraction > 0 or any(u.split == packing.VALIDATION for u in self._units):
      splits.append(packing.VALIDATION)
    out = {}
    for split in splits:
      out[split] = (with_split
                    | f"Only_{split}" >> beam.Filter(lambda sr, s=split: sr[0] == s)
                    | f"Example_{split}" >> beam.Map(lambda sr: packing.example(sr[1])))
    report_path = epath.Path(self.data_dir) / pack_report.REPORT_FILE  # TFDS's incomplete folder.
    fields, first_n = self._report_fields, self._first_n
    events = (
        (records | "RecordEvents" >> beam.Map(lambda r: ("record", r)),
         with_split | "KeptEvents" >> beam.Map(lambda sr: ("kept", sr)))
        | "Events" >> beam.Flatten())
    _ = (events
         | "Report" >> beam.CombineGlobally(_ReportFn(first_n))
         | "WriteReport" >> beam.Map(
             lambda report: report_path.write_text(
                 json.dumps(report.result(**fields), indent=1) + "\n")))
    return out
