"""Configuration: the defaults every config file builds on, the check run before anything else,
and the config.json a run and each of its stages keep."""
