"""driftloop retrain."""

# The retrain runs' logger: each run's failure with its traceback (retrain.runner, .runs, .process).
RETRAIN_LOGGER = "driftloop.retrain"
