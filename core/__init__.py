"""Shared pieces: settings, feature spec, database schema, registry, example data."""
