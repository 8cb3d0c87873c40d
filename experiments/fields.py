"""The experiment file's user errors. The one parser of settings and its `ConfigError` live in `trainer.settings`,
the lowest layer, so that the trainer and the cluster declare their settings with it too; they are re-exported here
because the experiments package reports them (`farflung: error: ...`, exit status 2)."""

from trainer.settings import ConfigError, check_keys, parse_settings, parse_values

__all__ = ["ConfigError", "check_keys", "parse_settings", "parse_values"]
