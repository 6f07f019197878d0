"""imgclf entry points: the Prefect flow and the command line over the stage functions."""
