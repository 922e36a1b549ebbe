"""kiln: an image classifier from raw data to a deployable bundle, as a Prefect 3 pipeline.

The core library (config, artifact store, dataset format, models, inference) lives here; the eight pipeline
stages live in the top-level `tasks/` package and the flows that chain them in `flows/`.
"""

__version__ = "0.1.0"
