"""gpuboss CLI."""
