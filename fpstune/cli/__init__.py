"""The `fpstune` command line: `commands` holds the typer app; one module per command group."""
