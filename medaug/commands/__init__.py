"""Typer command functions of `medaug` subcommands that live outside cli.py; heavy imports stay inside them."""
