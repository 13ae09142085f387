"""Command-line tools (data preparation, export/import, launchers, benchmarks), run from the repository root as
`python -m tools.NAME`."""
