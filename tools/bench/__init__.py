"""The subcommands of tools/benchmark.py, one module each; cli.py lists them and parses the command line."""
