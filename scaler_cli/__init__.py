"""The `scaler` command: a thin typer layer on top of the Python APIs of `scaler` (compiler) and
`trainers` (one model). Nothing below imports it."""
