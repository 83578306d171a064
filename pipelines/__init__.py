"""The product's concerns, one sub-package each, imported in this order (each may import the
ones before it, never one after):

- ``core``: label map, the one frame transform, codecs, metrics, pictures, job options;
- ``storage``: the one resolver, retries, conditional writes, the lease;
- ``runtime``: tracking store, cluster connection and capacity, watchdog, progress, fault points;
- ``data``: the one source reader under limits, ingest, dataset versions, shards;
- ``inference``: model directory, predictor, model actors, evaluation;
- ``registry``: registered versions, the pyfunc, aliases, promotion;
- ``training``: config, recipe, the worker loop, checkpoints, the MLflow record, the driver;
- ``labeling``: inputs, output, staging and commit, the CPU stages, the run loop.

``compat`` holds the private APIs of our dependencies that the product relies on. Each job of
``jobs/`` calls one ``run(config)`` of these; nothing here imports ``jobs``.
"""
