"""driftloop retrain."""
