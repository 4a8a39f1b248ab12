"""``rsedge batch``: answer one prompt about every item of an archive, resumably, on a process pool or on Ray.

items (what to answer: images, before/after pairs, GeoTIFF scenes) -> answer (one item through a loaded
Pipeline, by item kind) -> local / on_ray (where the answers run) -> journal (the JSONL output, appended line by
line, read back on a resume) -> runner (the loop that ties them, with progress and a summary).

Runtime modules: the stdlib and the runtime's own dependencies; rich for the progress bar and ray for ``--ray``
are imported only where used.
"""

# The default naming rule of a before/after pair (rsedge.batch.items.PairRule): name_A.png with name_B.png.
DEFAULT_PAIR_RULE = "{id}_A.*,{id}_B.*"
