"""driftloop monitor."""

# The loop's logger: a line for each monitor run and each retrain outcome (monitor.jobs, monitor.notify).
LOOP_LOGGER = "driftloop.loop"
