"""The data: finding the records of a delivery (:mod:`~pipelines.data.discover`), reading
source files under limits (:mod:`~pipelines.data.sources`), the ingest into a new dataset
version (:mod:`~pipelines.data.ingest`, :mod:`~pipelines.data.manifest`), dataset versions
committed last by a pointer (:mod:`~pipelines.data.versions`), the shards and the Ray datasets
over them (:mod:`~pipelines.data.shards`), decoding their frames
(:mod:`~pipelines.data.decode`) and synthetic drives (:mod:`~pipelines.data.synthetic`).

May import Ray (Ray Data), pyarrow, storage, ops and core; never PyTorch: the Ray tasks that
run this code start without it.
"""
