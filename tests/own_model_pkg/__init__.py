"""A user's own package for tests/app/test_own_model.py: models the zoo does not
know, reached from a config as "own_model_pkg.models:TinyNet" or registered
by a config file (registered_config.py)."""
