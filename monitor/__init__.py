"""driftloop monitor."""
