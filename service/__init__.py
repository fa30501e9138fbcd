"""driftloop service."""
