"""The eight pipeline stages. Each module holds a pure function (no Prefect) and a thin `@task` wrapper."""
