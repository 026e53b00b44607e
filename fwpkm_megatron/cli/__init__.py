"""Command-line entry points. Each is a thin `main(argv=None) -> int` over the library."""
