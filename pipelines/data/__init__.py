"""The data: finding the records of a delivery (:mod:`~pipelines.data.discover`), reading
source files under limits (:mod:`~pipelines.data.sources`), converting records
(:mod:`~pipelines.data.ingest`), the ingest workflow into a new dataset version
(:mod:`~pipelines.data.workflow`, :mod:`~pipelines.data.manifest`), dataset versions
committed last by a pointer (:mod:`~pipelines.data.versions`), the shards and the Ray datasets
over them (:mod:`~pipelines.data.shards`), decoding their frames
(:mod:`~pipelines.data.decode`) and synthetic drives (:mod:`~pipelines.data.synthetic`).

May import Ray (Ray Data), pyarrow, storage, runtime and core; never PyTorch: the Ray tasks that
run this code start without it.
"""
